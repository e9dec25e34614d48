"""The language-model losses every training stage shares: next-token cross-entropy fused with the
output projection, and token-level unlikelihood against repeating the answer.

Cross-entropy: `chunked_cross_entropy` computes (hidden @ weight.T) chunk by chunk and forms its
gradient in the same pass (Liger Kernel's fused linear cross-entropy, arXiv:2410.10989, in plain
torch), so the (rows x vocab) logits never exist whole and are never saved for backward.

Unlikelihood (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training",
arXiv:1908.04319, token level): at each answer position, the tokens the answer has already used
(other than the right next token) are "negative candidates" C, and the loss adds
    alpha * sum_{c in C} -log(1 - p(c | prefix)).
Maximum likelihood alone leaves a small model free to put its mass back on what it just said; a
greedy decoder then loops ("废寝忘餐，废寝忘餐，..."). On the demo SFT it cut plain-greedy answers
with a 4-gram repeated 3+ times from 17 % to 2.5 % at equal validation loss (docs/experiments.md).
Its gradient w.r.t. the logits z is closed-form, so it lives in the same fused pass:
    d/dz_j sum_c -log(1 - p_c) = sum_c w_c [j = c] - p_j sum_c w_c,   w_c = p_c / (1 - p_c).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100     # a label that is no target (padding, prompt, user turns): every loss skips it


def right_pad(rows, fill: int) -> torch.Tensor:
    """(B, T) long: each row left-aligned, the rest `fill`; T = the longest row. Every batch here is
    right-padded: under causal attention a real position never sees the padding after it."""
    out = torch.full((len(rows), max(len(r) for r in rows)), fill, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, :len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def answer_rows(prompts, answers, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompt + answer ids and their labels: each answer token at the position that predicts
    it, IGNORE elsewhere (RL rollouts, preference pairs)."""
    ids = right_pad([list(p) + list(a) for p, a in zip(prompts, answers)], pad_id)
    labels = torch.full_like(ids, IGNORE)
    for r, (p, a) in enumerate(zip(prompts, answers)):
        labels[r, len(p) - 1:len(p) + len(a) - 1] = ids[r, len(p):len(p) + len(a)]
    return ids, labels


def unlikelihood_candidates(labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """(B * T, K) negative candidates per target position of `labels` (B, T), -1 = none.

    The candidates of a target are the distinct tokens among the earlier targets of its row (the
    answer tokens already produced, across the row's assistant turns), without the target itself.
    K is the largest number of targets in a row.
    """
    B, T = labels.shape
    per_row, K = [], 1
    for r in range(B):
        idx = (labels[r] != ignore_index).nonzero().squeeze(1)
        a = labels[r, idx]
        n = len(a)
        if n == 0:
            continue
        j = torch.arange(n, device=labels.device)
        earlier = j[None, :] < j[:, None]                                   # [i, j]: j before i
        first = ~((a[:, None] == a[None, :]) & earlier).any(1)               # first use of a[j] in the row
        keep = earlier & first[None, :] & (a[None, :] != a[:, None])
        per_row.append((r, idx, torch.where(keep, a[None, :].expand(n, n), -1)))
        K = max(K, n)
    out = torch.full((B, T, K), -1, dtype=torch.long, device=labels.device)
    for r, idx, c in per_row:
        out[r, idx, :c.shape[1]] = c
    return out.view(B * T, K)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy (+ alpha x unlikelihood) of (hidden @ weight.T), gradients formed in the
    forward pass chunk by chunk: d(loss)/d(logits) = softmax - onehot (+ the unlikelihood term,
    see the module docstring) is built in place, so there is no log-softmax backward pass."""

    @staticmethod
    def forward(ctx, h, w, y, ignore_index: int, chunk_rows: int, cand, alpha: float):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        wc = w.to(h.dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_rows):
            hc, yc = h[s:s + chunk_rows], y[s:s + chunk_rows]
            # log_softmax is one vectorized kernel; logsumexp + subtract made three passes and
            # two (rows x vocab) temporaries.
            logp = torch.log_softmax((hc @ wc.t()).float(), dim=-1)
            valid = yc != ignore_index
            all_valid = bool(valid.all())
            yv = yc if all_valid else torch.where(valid, yc, torch.zeros_like(yc))
            picked = logp.gather(1, yv[:, None]).squeeze(1)
            total -= picked.sum() if all_valid else (picked * valid).sum()
            p = logp.exp_()                                       # softmax, in place
            if cand is not None:
                cc = cand[s:s + chunk_rows]
                cmask = cc >= 0
                ci = cc.clamp(min=0)
                pc = p.gather(1, ci) * cmask
                one_minus = (1.0 - pc).clamp_(min=1e-5)
                total -= alpha * (one_minus.log() * cmask).sum()
                wgt = alpha * pc / one_minus                      # 0 where there is no candidate
                p.mul_(1.0 - wgt.sum(1, keepdim=True))            # p - p * alpha * sum_c w_c ...
                p.scatter_add_(1, ci, wgt)                        # ... + alpha * w_c at each candidate
            if need_h or need_w:
                p[torch.arange(len(yv), device=p.device), yv] -= 1.0
                if not all_valid:
                    p.mul_(valid[:, None])
                pc = p.to(h.dtype)
                if need_h:
                    grad_h[s:s + chunk_rows] = pc @ wc
                if need_w:
                    grad_w.addmm_(pc.t().float() if pc.dtype != torch.float32 else pc.t(), hc.float())
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        gw = grad_w * g if grad_w is not None else None
        return gh, gw, None, None, None, None, None


@torch.compiler.disable
def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = IGNORE, chunk_rows: int = 1024,
                          ul_candidates: torch.Tensor | None = None, ul_alpha: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden @ weight.T` against labels (fp32 softmax), plus
    ul_alpha x the unlikelihood of `ul_candidates` (from unlikelihood_candidates; training only),
    fused with its gradient and chunked over rows (see _LinearCrossEntropy)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        cand = ul_candidates if ul_alpha > 0 else None
        return _LinearCrossEntropy.apply(h, weight, y, ignore_index, chunk_rows, cand, float(ul_alpha))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_rows):   # evaluation: the cross-entropy only
        logits = (h[s:s + chunk_rows] @ weight.to(h.dtype).t()).float()
        total += F.cross_entropy(logits, y[s:s + chunk_rows], ignore_index=ignore_index, reduction="sum")
    return total


# ---------------------------------------------------------------- outputs: what a loss needs from forward
# Each is passed as Transformer.forward(..., output=...) and runs inside forward on the final
# normed hidden states, so the heads' weights are used where DDP / FSDP / compile expect them.

class LMLoss:
    """The summed next-token cross-entropy (+ ul_alpha x unlikelihood) of the lm_head, fused and
    chunked (chunked_cross_entropy). `labels` are shifted: labels[:, t] follows input_ids[:, t]."""

    def __init__(self, labels: torch.Tensor, ignore_index: int = IGNORE, ul_candidates: torch.Tensor | None = None,
                 ul_alpha: float = 0.0):
        self.labels, self.ignore_index = labels, ignore_index
        self.ul_candidates, self.ul_alpha = ul_candidates, ul_alpha

    def __call__(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(hidden, model.lm_head.weight, self.labels, self.ignore_index,
                                     ul_candidates=self.ul_candidates, ul_alpha=self.ul_alpha)


class TokenLogProbs:
    """(B, T) log-probabilities of `labels` under softmax(logits / temperature), fp32, differentiable;
    positions where labels == ignore_index get 0. With entropy=True, also the (B, T) entropy of that
    distribution (0 where labels == ignore_index). RL scores its samples with these: the temperature
    and precision must be the ones the sampler used, or the ratio of the first update is not 1 (rlhf.md).

    The output projection runs on the labelled positions only: an RL row is mostly prompt and padding
    (a demo rollout labels about a third of its positions), and the (positions x vocabulary) logits,
    their log-softmax and its backward are most of a small model's step."""

    def __init__(self, labels: torch.Tensor, temperature: float = 1.0, ignore_index: int = IGNORE,
                 entropy: bool = False):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
        self.labels, self.temperature, self.ignore_index, self.entropy = labels, temperature, ignore_index, entropy

    @torch.compiler.disable     # the labelled positions make a data-dependent shape: keep it out of the graph
    def __call__(self, model: nn.Module, hidden: torch.Tensor):
        valid = self.labels != self.ignore_index
        logits = model.lm_head(hidden[valid]).float()              # (N, V), N = labelled positions
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, self.labels[valid].unsqueeze(-1)).squeeze(-1)
        zeros = torch.zeros(self.labels.shape, dtype=torch.float32, device=hidden.device)
        if not self.entropy:
            return zeros.masked_scatter(valid, picked)
        return zeros.masked_scatter(valid, picked), zeros.masked_scatter(valid, -(logp.exp() * logp).sum(-1))


class ScalarValues:
    """(B, T) values of a score head (reward model, critic) at every position; a stage reads the
    positions it needs (the last real token for a reward, every answer token for a critic)."""

    def __call__(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return model.score(hidden).squeeze(-1).float()


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE,
            ul_candidates: torch.Tensor | None = None, ul_alpha: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy (+ ul_alpha x unlikelihood) over labels != ignore_index, and how
    many there were. Works through DDP / torch.compile wrappers (the loss is computed inside forward)."""
    n = int((labels != ignore_index).sum())
    total = model(input_ids, output=LMLoss(labels, ignore_index, ul_candidates, ul_alpha))
    return total / max(n, 1), n
