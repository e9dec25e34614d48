"""bench/serve.py's pure helpers (percentiles, the per-run summary, the final JSON, the token count), and the
engine's batched prefill: prompts admitted together are prefilled in one forward and answer what they answer
alone."""
from __future__ import annotations

import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import serve as bench  # noqa: E402


def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 33):
        xs = rng.random(n).tolist()
        for q in (0, 50, 95, 100):
            assert math.isclose(bench.percentile(xs, q), float(np.percentile(xs, q)), rel_tol=1e-12)
    assert bench.percentile([], 50) is None


def test_summary_counts_cut_requests_as_censored_ttft_and_keeps_their_tokens():
    R = bench.Rec
    recs = [R(0, "a", sent=0.0, first=0.1, end=1.0, finish="stop", tokens=10, chunks=10),
            R(1, "b", sent=0.0, first=0.3, end=2.0, finish="length", tokens=20, chunks=19),
            R(2, "c", sent=0.5, first=None, end=3.0, cut=True),                 # queued until the cut
            R(3, "d", sent=0.0, first=0.2, end=3.0, cut=True, tokens=5, chunks=5),
            R(4, "e", sent=0.0, end=0.1, error="APIError: boom")]
    s = bench.summarize(recs, wall=3.0, server_cpu=0.35, client_cpu=0.07)
    assert (s["requests"], s["completed"], s["cut"], s["errors"], s["tokens"]) == (5, 2, 2, 1, 35)
    assert s["tokens_per_s"] == round(35 / 3.0, 1)
    assert s["ttft_censored"] == 1
    assert s["ttft_p50_s"] == pytest.approx(np.percentile([0.1, 0.3, 2.5, 0.2], 50))
    assert s["finish"] == {"stop": 1, "length": 1}
    assert s["server_cpu_s_per_1k_tokens"] == 10.0 and s["client_cpu_s_per_1k_tokens"] == 2.0
    assert s["error_samples"] == ["APIError: boom"]


def test_rounds_combine_to_the_median_rate_and_pooled_requests():
    R = bench.Rec
    runs = [([R(0, "a", sent=0.0, first=0.1, end=1.0, finish="stop", tokens=100)], 1.0, 0.2, 0.1),
            ([R(1, "a", sent=0.0, first=0.3, end=2.0, finish="stop", tokens=100)], 2.0, 0.2, 0.1),
            ([R(2, "a", sent=0.0, first=0.2, end=4.0, finish="stop", tokens=100)], 4.0, 0.2, 0.1)]
    c = bench.combine(runs)
    assert c["tokens_per_s_rounds"] == [100.0, 50.0, 25.0] and c["tokens_per_s"] == 50.0
    assert c["requests"] == 3 and c["tokens"] == 300 and c["ttft_p50_s"] == 0.2
    assert c["server_cpu_s_per_1k_tokens"] == 2.0


def test_token_count_is_max_tokens_for_length_and_the_re_encoded_text_otherwise():
    class Tok:
        def encode(self, text):
            return list(text)
    recs = [bench.Rec(0, "a", text="你好吗", finish="stop"), bench.Rec(1, "b", text="xy", finish="length"),
            bench.Rec(2, "c", text="", cut=True)]
    bench.count_tokens(recs, Tok(), max_tokens=64)
    assert [r.tokens for r in recs] == [3, 64, 0]


def test_final_json_keys_and_ratios():
    def level(tps, p95, errors=0):
        return {"tokens_per_s": tps, "ttft_p95_s": p95, "errors": errors}
    results = {"ours": {1: level(100.0, 0.01), 8: level(400.0, 0.05), 32: level(800.0, 0.1, errors=1)},
               "llama_cpp": {1: level(150.0, 0.01), 8: level(150.0, 0.5), 32: level(160.0, 2.0)}}
    out = bench.final_json(results, [1, 8, 32], {"slots": 32})
    assert out["tokens_per_s"] == {"ours": {"1": 100.0, "8": 400.0, "32": 800.0},
                                   "llama_cpp": {"1": 150.0, "8": 150.0, "32": 160.0}}
    assert out["batching_speedup_32"] == 8.0 and out["vs_llama_cpp_32"] == 5.0
    assert out["ttft_p95_s_32"] == {"ours": 0.1, "llama_cpp": 2.0}
    assert out["errors"] == 1 and out["slots"] == 32
    alone = bench.final_json({"ours": results["ours"], "llama_cpp": None}, [1, 8, 32], {})
    assert alone["tokens_per_s"]["llama_cpp"] is None and alone["vs_llama_cpp_32"] is None
    assert alone["ttft_p95_s_32"] == {"ours": 0.1, "llama_cpp": None}


def test_default_threads_leave_busy_cores_alone():
    assert bench.default_threads(2, 0.1) == 2
    assert bench.default_threads(2, 1.2) == 1
    assert bench.default_threads(2, 3.7) == 1
    assert bench.default_threads(16, 4.0) == 12


# ---------------------------------------------------------------- the engine's batched prefill

def test_prefill_groups_bound_the_padding():
    from zero_chatgpt.serve import engine as eng

    class R:
        def __init__(self, n):
            self.prompt = [1] * n
    admitted = [(R(n), [i]) for i, n in enumerate([30, 5, 28, 6, 29, 400, 7])]
    groups = eng.prefill_groups(admitted)
    assert sorted(len(r.prompt) for g in groups for r, _ in g) == [5, 6, 7, 28, 29, 30, 400]
    for g in groups:
        lens = [len(r.prompt) for r, _ in g]
        assert len(g) * max(lens) <= eng.PREFILL_PAD_RATIO * sum(lens) or len(g) == 1
    assert [len(r.prompt) for r, _ in groups[-1]] == [400]        # the long prompt does not pad the short ones
    big = [(R(3000), [i]) for i in range(5)]
    assert all(len(g) * 3000 <= eng.PREFILL_MAX_TOKENS for g in eng.prefill_groups(big))


@pytest.fixture(scope="module")
def tiny():
    """A random model (stop rows zeroed: answers never end) and a small BPE tokenizer."""
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    from zero_chatgpt.model.tokenizer import train_bpe
    tok = train_bpe(["苹果是一种水果，长江是中国最长的河流。", "北京是中国的首都，一见倾心是成语。"] * 20, 300)
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        for i in tok.stop_ids:
            model.lm_head.weight[i] = 0.0
    return model, tok


def _run_together(model, tok, prompts, sampling, patch=None):
    """Submit every prompt before the engine starts (so that one step admits them all); the texts and the
    prefill group sizes."""
    from zero_chatgpt.serve.engine import Engine, Request
    engine = Engine(model, tok, slots=len(prompts), queue=16)
    groups = []
    prefill = engine._prefill

    def counting(group):
        groups.append(len(group))
        if patch is not None:
            patch(group)
        prefill(group)
    engine._prefill = counting
    texts = {i: "" for i in range(len(prompts))}
    done = [threading.Event() for _ in prompts]

    def emit_for(i):
        def emit(ev):
            if ev[0] == "text":
                texts[i] += ev[2]
            elif ev[0] in ("done", "error"):
                if ev[0] == "error":
                    texts[i] = f"ERROR {ev[1]}"
                done[i].set()
        return emit
    for i, p in enumerate(prompts):
        engine.submit(Request(prompt=p, sampling=sampling, n=1, emit=emit_for(i)))
    engine.start()
    try:
        for d in done:
            assert d.wait(60)
    finally:
        engine.stop()
    load = engine.load()
    assert {k: load[k] for k in ("slots", "busy", "queued")} == {"slots": len(prompts), "busy": 0, "queued": 0}
    assert load["prefill_s"] > 0 and load["decode_s"] > 0
    return [texts[i] for i in range(len(prompts))], groups


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_prompts_admitted_together_share_a_prefill_and_answer_as_alone(tiny, penalty):
    from zero_chatgpt.model.generate import generate
    from zero_chatgpt.serve.engine import Sampling
    model, tok = tiny
    questions = ("苹果是什么？", "长江", "一见倾心是什么意思？请解释一下", "北京", "长江是中国最长的河流吗？")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]
    assert len({len(p) for p in prompts}) > 2                     # different lengths: padding is exercised
    new = 12
    alone = [tok.decode(generate(model, [p], max_new_tokens=new, temperature=0.0,
                                 repetition_penalty=penalty)[0].tokens) for p in prompts]
    sampling = Sampling(max_tokens=new, temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=penalty)
    texts, groups = _run_together(model, tok, prompts, sampling)
    assert texts == alone
    assert sum(groups) == len(prompts) and len(groups) < len(prompts)     # fewer forwards than prompts


def test_a_failed_batched_prefill_retries_each_prompt_alone(tiny):
    from zero_chatgpt.serve.engine import Sampling
    model, tok = tiny
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("苹果是什么？", "长江是什么？", "北京是什么？")]

    def fail_batches(group):
        if len(group) > 1:
            raise RuntimeError("out of memory")
    texts, groups = _run_together(model, tok, prompts, Sampling(max_tokens=5, temperature=0.0), patch=fail_batches)
    assert groups[0] == 3 and groups[1:] == [1, 1, 1]
    assert all(t and not t.startswith("ERROR") for t in texts)
