"""The generator: greedy against a naive loop, sampling knobs against transformers' processors,
stops, streaming, log-probabilities, reproducibility."""
from __future__ import annotations

import itertools

import pytest
import torch

from zero_chatgpt.model.sampling import process_logits
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.transformer import ModelConfig, Transformer



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    with torch.no_grad():   # sharper distributions than at init, so greedy paths are distinctive
        m.lm_head.weight.mul_(20)
    return m


def naive(model, prompt, n):
    ids, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            nxt = int(logits.argmax())
            lps.append(float(logits.log_softmax(-1)[nxt]))
            ids.append(nxt)
    return ids[len(prompt):], lps


def test_greedy_batched_left_padded_equals_naive_loop(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    seen = []
    gens = generate(model, prompts, max_new_tokens=10, temperature=0, return_logprobs=True,
                    stream=lambda i, t: seen.append((i, t)))
    for i, (p, g) in enumerate(zip(prompts, gens)):
        toks, lps = naive(model, p, 10)
        assert g.tokens == toks and g.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(g.logprobs, lps)) < 1e-4
        assert [t for j, t in seen if j == i] == toks


@pytest.mark.slow
def test_compiled_decode_equals_the_naive_loop_and_the_cache_is_written(model):
    """generate(compile=True): every decode step is one compiled graph over a static cache (grouped-query
    heads here, left padding, a stop id ending one row early, a prompt near the context limit): the same
    tokens and log-probs as the plain forward, and eager generate's own stop / length behaviour."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11]]
    gens = generate(model, prompts, max_new_tokens=12, temperature=0, return_logprobs=True, compile=True)
    for p, g in zip(prompts, gens):
        toks, lps = naive(model, p, 12)
        assert g.tokens == toks and g.finish_reason == "length"
        assert max(abs(a - b) for a, b in zip(g.logprobs, lps)) < 1e-4
    toks, _ = naive(model, [3, 4], 8)
    stop = toks[4]
    g = generate(model, [[3, 4], [5, 3, 4]], max_new_tokens=8, temperature=0, stop_ids=(stop,), compile=True)
    eager = generate(model, [[3, 4], [5, 3, 4]], max_new_tokens=8, temperature=0, stop_ids=(stop,))
    assert [x.tokens for x in g] == [x.tokens for x in eager] and g[0].tokens == toks[:toks.index(stop) + 1]
    g = generate(model, [list(range(1, 61))], max_new_tokens=10, temperature=0, compile=True)
    assert g[0].tokens == naive(model, list(range(1, 61)), 4)[0]


def test_stop_ids_and_length_limit(model):
    toks, _ = naive(model, [3, 4], 8)
    stop = toks[4]
    g = generate(model, [[3, 4], [3, 4]], max_new_tokens=8, temperature=0, stop_ids=(stop,))
    first = toks.index(stop)
    assert g[0].tokens == toks[:first + 1] and g[0].finish_reason == "stop"
    # a prompt near max_position_embeddings gets only the room left
    g = generate(model, [list(range(1, 61))], max_new_tokens=10, temperature=0)
    assert len(g[0].tokens) == 4


def test_rows_that_finish_leave_the_batch_without_changing_any_answer(model):
    """Rows stop at different steps (a common token as the stop id), so the batch drops finished rows
    more than once; every answer, log-prob and stream must be what the prompt gets alone."""
    import zero_chatgpt.model.generate as gen_mod
    prompts = [[i % 90 + 1, (7 * i) % 90 + 1, (3 * i) % 50 + 2][: 1 + i % 3] for i in range(16)]
    free = generate(model, prompts, max_new_tokens=20, temperature=0)
    counts = {}
    for g in free:
        for t in set(g.tokens):
            counts[t] = counts.get(t, 0) + 1
    stop = max(counts, key=counts.get)           # the token most answers reach, at different steps
    ends = sorted(g.tokens.index(stop) for g in free if stop in g.tokens)
    assert len(ends) >= 8 and len(set(ends)) >= 3, "the batch must lose rows at several steps"
    drops = []
    real_keep = gen_mod.KVCache.keep_rows

    def keep_rows(self, rows):
        drops.append(len(rows))
        real_keep(self, rows)
    gen_mod.KVCache.keep_rows = keep_rows
    try:
        seen = []
        batch = generate(model, prompts, max_new_tokens=20, temperature=0, stop_ids=(stop,), repetition_penalty=1.3,
                         return_logprobs=True, stream=lambda i, t: seen.append((i, t)))
    finally:
        gen_mod.KVCache.keep_rows = real_keep
    assert len(drops) >= 2, drops
    for i, (p, g) in enumerate(zip(prompts, batch)):
        alone = generate(model, [p], max_new_tokens=20, temperature=0, stop_ids=(stop,), repetition_penalty=1.3,
                         return_logprobs=True)[0]
        assert g.tokens == alone.tokens and g.finish_reason == alone.finish_reason, i
        assert max(abs(a - b) for a, b in zip(g.logprobs, alone.logprobs)) < 1e-4
        assert [t for j, t in seen if j == i] == g.tokens


def test_sampling_is_seeded_and_topk1_is_greedy(model):
    prompts = [[5, 6], [7]]
    a = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompts, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(2))
    assert [g.tokens for g in a] == [g.tokens for g in b] != [g.tokens for g in c]
    k1 = generate(model, prompts, max_new_tokens=12, temperature=0.7, top_k=1, generator=torch.Generator())
    greedy = generate(model, prompts, max_new_tokens=12, temperature=0)
    assert [g.tokens for g in k1] == [g.tokens for g in greedy]


def test_logit_processing_matches_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    torch.manual_seed(3)
    logits = torch.randn(4, 50) * 3
    ids = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    ours = process_logits(logits, seen, 1.3, 0.7, 10, 0.8)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        theirs = proc(ids, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    fin = ~torch.isinf(ours)
    assert torch.allclose(ours[fin], theirs[fin], atol=1e-6)


def test_stop_strings_and_text(tmp_path):
    from zero_chatgpt.data.builtin import iter_peoples_daily
    from zero_chatgpt.model.tokenizer import train_bpe
    tok = train_bpe([a["text"] for a in itertools.islice(iter_peoples_daily(), 30)], 400)
    torch.manual_seed(5)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=128)).eval()
    free = generate(m, [tok.encode("中国")], max_new_tokens=30, temperature=0, tokenizer=tok)[0]
    assert free.text == tok.decode(free.tokens)
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    g = generate(m, [tok.encode("中国")], max_new_tokens=30, temperature=0, tokenizer=tok, stop_strings=[stop])[0]
    assert g.finish_reason == "stop" and stop not in g.text and free.text.startswith(g.text)
    assert len(g.tokens) < len(free.tokens)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(m, [[1]], max_new_tokens=2, stop_strings=["x"])



def test_draw_samples_the_softmax_and_never_a_filtered_token():
    from zero_chatgpt.model.sampling import draw
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(60, generator=g) * 2
    scores[[0, 7, 59]] = float("-inf")            # filtered (top-k / top-p), also at both ends
    n = 200_000
    got = torch.bincount(draw(scores.expand(n, -1).contiguous(), g), minlength=60).double() / n
    p = scores.softmax(-1).double()
    assert got[[0, 7, 59]].sum() == 0
    # every frequency within 5 standard errors of its probability
    assert ((got - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all(), (got - p).abs().max()
    # one token left after filtering: always that one
    one = torch.full((1000, 60), float("-inf"))
    one[:, 59] = 0.0
    assert (draw(one, g) == 59).all()
