"""Training-step speed: our model + loss vs transformers' LlamaForCausalLM, same run.

Both sides get the same config, the same initial weights, the same batches, the same
optimizer (AdamW, fused, weight decay on matrices only, built by train/loop.py), the same
precision (`auto` = what the training loop would pick on this device), and are timed in
alternating rounds in one process so that load from other processes hits both alike.
Ours runs as the loop runs it with `compile = true`: torch.compile'd model and the fused
linear cross-entropy; compile time is excluded from the rate and reported. transformers
runs eagerly with its default (sdpa) attention: its normal training path.

Configs: the `demo` preset (vocab 4096, as the demo tokenizer) and a few steps of
`seed-0.1b` (vocab 32006, shorter sequences so it fits a laptop). Peak memory is the
peak resident set (CPU; reset through /proc/self/clear_refs) or peak allocated (CUDA)
above what was in use before that model was built.

    .venv/bin/python bench/train_speed.py [--quick] [--device auto|cpu|cuda] [--no-compile]

Last stdout line: JSON with speedup_vs_hf (demo), speedup_vs_hf_0p1b, tokens_per_s (ours,
demo), peak_mem_mb, and the details.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from zero_chatgpt.core import config  # noqa: E402
from zero_chatgpt.core.runtime import resolve_precision  # noqa: E402
from zero_chatgpt.model.losses import lm_loss  # noqa: E402
from zero_chatgpt.model.transformer import Transformer, model_config_from  # noqa: E402
from zero_chatgpt.train.loop import LoopSettings  # noqa: E402
from zero_chatgpt.train.optim import build_optimizer  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Mem:
    """Peak memory of one side, above the baseline when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")   # reset VmHWM to the current RSS
        except OSError:
            pass

    def peak(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return hwm_mb() - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CONFIGS = {"demo": ("demo", 4096), "seed-0.1b": ("seed-0.1b", 32006)}


def make_side(impl: str, preset: str, seq_len: int, batch: int, device: torch.device, precision: str,
              compile_ours: bool, init: dict | None = None):
    """(model, step function, initial weights) for one side; both sides see the same batches."""
    from transformers import LlamaConfig, LlamaForCausalLM
    name, vocab = CONFIGS[preset]
    cfg = model_config_from(config.load_preset(name).model, vocab)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        x = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        data.append((x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    torch.manual_seed(0)
    if impl == "ours":
        model = Transformer(cfg).to(device)
        init = init or {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(init)
        if compile_ours:
            model.compile()
        loss_of = lambda m, x: lm_loss(m, x[0], x[1])[0]   # noqa: E731
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict())).to(device)
        if init is not None:
            model.load_state_dict(init)
        # pre-shifted labels: the same 256 targets per row as ours
        loss_of = lambda m, x: m(input_ids=x[0], labels=x[1], shift_labels=x[1]).loss  # noqa: E731
    opt = build_optimizer(model, LoopSettings(lr=1e-4), device)
    state = {"i": 0}

    def step():
        x = data[state["i"] % len(data)]
        state["i"] += 1
        with autocast:
            loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return model, step, init, cfg


def mem_child(preset: str, impl: str, seq_len: int, batch: int, device: torch.device, precision: str,
              compile_ours: bool) -> None:
    """In a fresh process: peak memory of building one side and running two steps."""
    mem = Mem(device)
    mem.start()
    _, step, _, _ = make_side(impl, preset, seq_len, batch, device, precision, compile_ours)
    step()
    step()
    sync(device)
    print(json.dumps({"peak_mb": round(mem.peak(), 1)}))


def peak_in_child(preset, impl, seq_len, batch, device, precision, compile_ours) -> float:
    import subprocess
    cmd = [sys.executable, __file__, "--mem-child", preset, impl, str(seq_len), str(batch), "--device", str(device),
           "--precision", precision, "--threads", str(torch.get_num_threads())] + ([] if compile_ours else ["--no-compile"])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])["peak_mb"]


def measure(preset: str, seq_len: int, batch: int, device: torch.device, precision: str, compile_ours: bool,
            rounds: int, steps_per_round: int, memory: bool = True) -> dict:
    _, ours_step, init, cfg = make_side("ours", preset, seq_len, batch, device, precision, compile_ours)
    t0 = time.perf_counter()
    first_ours = ours_step().item()
    ours_step()
    sync(device)
    warm_ours = time.perf_counter() - t0
    _, hf_step, _, _ = make_side("hf", preset, seq_len, batch, device, precision, compile_ours, init)
    del init
    t0 = time.perf_counter()
    first_hf = hf_step().item()
    hf_step()
    sync(device)
    warm_hf = time.perf_counter() - t0

    times = {"ours": [], "hf": []}
    for _ in range(rounds):
        for key, fn in (("ours", ours_step), ("hf", hf_step)):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                fn()
            sync(device)
            times[key].append((time.perf_counter() - t0) / steps_per_round)
    del ours_step, hf_step
    gc.collect()
    peaks = {impl: peak_in_child(preset, impl, seq_len, batch, device, precision, compile_ours)
             for impl in ("ours", "hf")} if memory else {"ours": None, "hf": None}
    best = {k: min(v) for k, v in times.items()}
    tokens = batch * seq_len
    res = {"config": preset, "params_m": round(cfg.num_params() / 1e6, 2), "tokens_per_step": tokens,
           "precision": precision, "compiled": compile_ours,
           "tokens_per_s": {"ours": round(tokens / best["ours"], 1), "hf": round(tokens / best["hf"], 1)},
           "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
           "speedup_vs_hf": round(best["hf"] / best["ours"], 3),
           # the ratio of medians too: on a shared machine one quiet round can flatter either side
           "speedup_vs_hf_median": round(statistics.median(times["hf"]) / statistics.median(times["ours"]), 3),
           "first_loss": {"ours": round(first_ours, 5), "hf": round(first_hf, 5)},
           "warmup_s": {"ours (incl. compile)": round(warm_ours, 1), "hf": round(warm_hf, 1)},
           "peak_mem_mb": peaks}
    print(json.dumps(res), file=sys.stderr, flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer, shorter rounds; no torch.compile; no memory measurement (< 60 s); a smoke "
                         "test: its 64-token 0.1B steps are too short to time reliably on a shared CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--no-compile", action="store_true", help="run our model eagerly too")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--mem-child", nargs=4, metavar=("PRESET", "IMPL", "SEQ", "BATCH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    precision = resolve_precision(a.precision, device)
    if a.mem_child:
        p, impl, seq, batch = a.mem_child
        return mem_child(p, impl, int(seq), int(batch), device, precision, not a.no_compile)
    compile_ours = not (a.quick or a.no_compile)
    big = device.type == "cuda"
    demo = measure("demo", 256, 16, device, precision, compile_ours,
                   rounds=2 if a.quick else 4, steps_per_round=1 if a.quick else 3, memory=not a.quick)
    seq, rows = (1024, 8) if big else ((64, 1) if a.quick else (256, 2))
    seed = measure("seed-0.1b", seq, rows, device, precision, compile_ours, rounds=2 if a.quick else 3,
                   steps_per_round=2, memory=not a.quick)
    print(json.dumps({
        "speedup_vs_hf": demo["speedup_vs_hf"], "speedup_vs_hf_0p1b": seed["speedup_vs_hf"],
        "speedup_vs_hf_median": {"demo": demo["speedup_vs_hf_median"], "seed-0.1b": seed["speedup_vs_hf_median"]},
        "tokens_per_s": demo["tokens_per_s"]["ours"], "tokens_per_s_hf": demo["tokens_per_s"]["hf"],
        "tokens_per_s_0p1b": seed["tokens_per_s"],
        "peak_mem_mb": {"demo": demo["peak_mem_mb"], "seed-0.1b": seed["peak_mem_mb"]},
        "precision": precision, "compiled": compile_ours, "device": str(device), "threads": torch.get_num_threads(),
        "compile_s": {"demo": demo["warmup_s"], "seed-0.1b": seed["warmup_s"]},
        "first_loss": {"demo": demo["first_loss"], "seed-0.1b": seed["first_loss"]},
    }))


if __name__ == "__main__":
    main()
