"""Decode speed: our generator vs transformers' `generate`, on the same exported weights.

The model is the `demo` preset's shape, saved as an HF folder exactly as
`zero-chatgpt export` writes it (or `--model PATH`: any exported / checkpoint folder, e.g.
RUN_DIR/pretrain/final), loaded once by `checkpoint.load_model` and once by
`AutoModelForCausalLM`. Both decode greedily (the same sampling rule, so the outputs must
be identical token for token — checked and reported) for `new` tokens with no early stop,
at batch 1 and batch 8 (prompts of different lengths, left-padded), timed in alternating
rounds in one process. tokens/s counts generated tokens (prefill included in the time).
Ours runs two ways: eagerly (its preallocated KV cache, a lean per-step loop and, while generating,
an inference copy of the weights: q/k/v and gate/up concatenated, transposed to the layout CPU GEMMs
run fastest for few rows; model.Transformer.fused_for_inference) and with `generate(compile=True)`
(each decode step one torch.compile'd graph over a static cache: model/static_decode.py; its compile
time is the first call's, reported, not in the rate). transformers runs its default generate path
(DynamicCache, sdpa), eagerly; its own static-cache compile path is not measured here.

    .venv/bin/python bench/generate.py [--quick] [--model PATH]

Last stdout line: JSON with speedup_vs_hf (the smaller over batch 1 and 8 of our faster way's speedup),
speedup_vs_hf_batch1 / _batch8 (eager), speedup_vs_hf_compiled_batch1 / _batch8, and details.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from zero_chatgpt.core import config  # noqa: E402
from zero_chatgpt.core.checkpoint import load_model, write_model_files  # noqa: E402
from zero_chatgpt.model.generate import generate  # noqa: E402
from zero_chatgpt.model.transformer import Transformer, model_config_from  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (< 60 s)")
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: a demo-shaped model)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    tmp = None
    folder = a.model
    if folder is None:
        tmp = tempfile.TemporaryDirectory()
        folder = Path(tmp.name)
        cfg = model_config_from(config.load_preset("demo").model, 4096)
        torch.manual_seed(0)
        m = Transformer(cfg)
        with torch.no_grad():   # a peakier distribution than at init: fewer near-ties in argmax
            m.lm_head.weight.mul_(30)
        write_model_files(folder, m.state_dict(), cfg)
    ours = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vocab = ours.config.vocab_size
    new = 64 if a.quick else 128
    rounds = 2 if a.quick else 4
    g = torch.Generator().manual_seed(1)
    results = {}
    for B in (1, 8):
        lens = [32] if B == 1 else [24 + 2 * i for i in range(B)]
        prompts = [torch.randint(0, vocab - 8, (n,), generator=g).tolist() for n in lens]
        L = max(lens)
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.tensor(p)
            mask[i, L - len(p):] = 1

        def run_ours():
            return [x.tokens for x in generate(ours, prompts, max_new_tokens=new, temperature=0)]

        def run_compiled():
            return [x.tokens for x in generate(ours, prompts, max_new_tokens=new, temperature=0, compile=True)]

        def run_hf():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            return [row[L:].tolist() for row in out]

        t0 = time.perf_counter()
        mine = run_ours()   # also the warmup
        t1 = time.perf_counter()
        mine_compiled = run_compiled()   # the warmup and the compile
        warm = {"ours": round(t1 - t0, 1), "ours_compiled": round(time.perf_counter() - t1, 1)}
        theirs = run_hf()
        same = mine == theirs and mine_compiled == theirs
        times = {"ours": [], "ours_compiled": [], "hf": []}
        for _ in range(rounds):
            for k, fn in (("ours", run_ours), ("ours_compiled", run_compiled), ("hf", run_hf)):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        results[f"batch_{B}"] = {"tokens_per_s": {k: round(B * new / v, 1) for k, v in best.items()},
                                 "speedup_vs_hf": round(best["hf"] / best["ours"], 3),
                                 "speedup_vs_hf_compiled": round(best["hf"] / best["ours_compiled"], 3),
                                 "same_tokens": same,
                                 "first_call_s": warm,
                                 "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()}}
        print(json.dumps({f"batch_{B}": results[f"batch_{B}"]}), file=sys.stderr, flush=True)
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps({"speedup_vs_hf": min(max(r["speedup_vs_hf"], r["speedup_vs_hf_compiled"])
                                           for r in results.values()),
                      "speedup_vs_hf_batch1": results["batch_1"]["speedup_vs_hf"],
                      "speedup_vs_hf_batch8": results["batch_8"]["speedup_vs_hf"],
                      "speedup_vs_hf_compiled_batch1": results["batch_1"]["speedup_vs_hf_compiled"],
                      "speedup_vs_hf_compiled_batch8": results["batch_8"]["speedup_vs_hf_compiled"],
                      "compile_s": {k: r["first_call_s"]["ours_compiled"] for k, r in results.items()},
                      "tokens_per_s": {k: r["tokens_per_s"] for k, r in results.items()},
                      "same_tokens": all(r["same_tokens"] for r in results.values()),
                      "new_tokens": new, "params_m": round(ours.config.num_params() / 1e6, 2),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
