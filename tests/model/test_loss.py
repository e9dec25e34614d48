"""The fused cross-entropy + unlikelihood against a plain autograd implementation of the same formulas."""
from __future__ import annotations

import pytest
import torch

from zero_chatgpt.model.losses import chunked_cross_entropy, unlikelihood_candidates

IGN = -100


def test_candidates_are_earlier_distinct_answer_tokens_without_the_target():
    lab = torch.tensor([[IGN, 5, 6, 5, 7, IGN],
                        [IGN, IGN, IGN, IGN, IGN, IGN],
                        [9, 9, IGN, 8, 9, IGN]])
    c = unlikelihood_candidates(lab).view(3, 6, -1)
    as_sets = [[sorted(int(x) for x in c[r, t] if x >= 0) for t in range(6)] for r in range(3)]
    assert as_sets[0] == [[], [], [5], [6], [5, 6], []]      # the second 5 is not its own negative
    assert as_sets[1] == [[]] * 6
    # earlier turns of the row count too (position 3 follows a masked span); repeats listed once
    assert as_sets[2] == [[], [], [], [9], [8], []]
    assert c.shape[-1] == 4                                  # K = the most targets in a row


def reference(h, w, y, cand, alpha):
    logp = torch.log_softmax((h @ w.t()).float(), -1)
    valid = y != IGN
    ce = -(logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid).sum()
    if cand is None or alpha == 0:
        return ce
    cm = cand >= 0
    pc = logp.gather(1, cand.clamp(min=0)).exp() * cm
    return ce - alpha * (torch.log((1 - pc).clamp(min=1e-5)) * cm).sum()


@pytest.mark.parametrize("alpha,chunk", [(0.0, 1024), (1.0, 1024), (0.5, 7)])
def test_fused_loss_and_gradients_match_autograd(alpha, chunk):
    torch.manual_seed(0)
    B, T, d, V = 3, 11, 16, 23
    y = torch.randint(0, V, (B, T))
    y[0, :4] = IGN
    y[2, 7:] = IGN
    y[1, 5] = y[1, 2] = y[1, 8]                              # repeats inside an answer
    cand = unlikelihood_candidates(y)
    h0 = torch.randn(B * T, d)
    w0 = torch.randn(V, d) * 0.5
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    got = chunked_cross_entropy(h1, w1, y.view(-1), chunk_rows=chunk, ul_candidates=cand, ul_alpha=alpha)
    got.backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    want = reference(h2, w2, y.view(-1), cand, alpha)
    want.backward()
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got, want)
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5) and torch.allclose(w1.grad, w2.grad, atol=1e-5)
    if alpha:
        assert got > reference(h0, w0, y.view(-1), None, 0.0)  # the unlikelihood term is there


def test_unlikelihood_lowers_the_probability_of_repeating():
    """A few steps on one answer that repeats a token: with unlikelihood, the model's probability of
    saying an earlier token again (where the data does not) ends lower than with plain likelihood."""
    torch.manual_seed(0)
    V, d = 12, 8
    y = torch.tensor([[1, 2, 3, 1, 4, 5, 6, 7]])              # "1" is repeated once, legitimately
    cand = unlikelihood_candidates(y)
    h = torch.randn(8, d)

    def train(alpha):
        w = torch.zeros(V, d, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.5)
        for _ in range(50):
            opt.zero_grad()
            chunked_cross_entropy(h, w, y.view(-1), ul_candidates=cand, ul_alpha=alpha).backward()
            opt.step()
        p = torch.softmax(h @ w.detach().t(), -1)
        neg = cand >= 0
        return float((p.gather(1, cand.clamp(min=0)) * neg).sum() / neg.sum()), float(p[torch.arange(8), y[0]].mean())

    plain_neg, plain_pos = train(0.0)
    ul_neg, ul_pos = train(1.0)
    assert ul_neg < 0.7 * plain_neg, (ul_neg, plain_neg)
    assert ul_pos > 0.8 * plain_pos                           # the right tokens stay likely


def test_answer_rows_label_each_answer_token_at_the_position_that_predicts_it():
    from zero_chatgpt.model.losses import IGNORE, answer_rows, right_pad
    ids, labels = answer_rows([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert labels.tolist() == [[IGNORE, IGNORE, 5, 6, IGNORE], [7, 8, 9, IGNORE, IGNORE]]
    assert right_pad([[1], [2, 3, 4]], -1).tolist() == [[1, -1, -1], [2, 3, 4]]
