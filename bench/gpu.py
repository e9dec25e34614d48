"""The GPU path in one run: seed-0.1b training speed and MFU, peak memory, generation speed.

    .venv/bin/python bench/gpu.py [--quick] [--device auto|cpu|cuda] [--steps 30] [--no-compile]

Trains the `seed-0.1b` model (random weights: this measures speed, not learning) for `--steps`
steps after a few untimed warm-up steps (compilation happens there), as the training loop runs
it: bf16 autocast, `torch.compile`, the fused linear cross-entropy, the loop's AdamW. Then times
the package's generator at batch 1 and 32 (greedy, fixed length) and decodes a short sample.

MFU = achieved model FLOP/s / the device's dense bf16 peak, with the model FLOPs per trained
token = ModelConfig.flops_per_token: 6 N + 12 L d T / 2 (N = parameters without the embedding table,
L layers, d hidden size, T sequence length: the matmuls plus causal attention, PaLM's appendix B), the
training loop's own count. The peak comes from core/runtime.GPU_PEAK_BF16 by device name (the table
`zero-chatgpt plan` uses); on a CPU or an unknown device MFU is null.

`--quick` (for the CPU and the test): the `demo` model, short sequences, 3 steps, no compile.
Last stdout line: JSON with mfu, tokens_per_s, device, peak_mem_mb, gen_tokens_per_s_b1,
gen_tokens_per_s_b32 and the settings.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from zero_chatgpt.core import config  # noqa: E402
from zero_chatgpt.core.runtime import gpu_peak_bf16  # noqa: E402
from zero_chatgpt.model.generate import generate  # noqa: E402
from zero_chatgpt.model.losses import lm_loss  # noqa: E402
from zero_chatgpt.model.transformer import Transformer, model_config_from  # noqa: E402
from zero_chatgpt.train.loop import LoopSettings  # noqa: E402
from zero_chatgpt.train.optim import build_optimizer  # noqa: E402


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_mem_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the demo model, short sequences, few steps, no compile")
    ap.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    ap.add_argument("--steps", type=int, default=0, help="timed training steps (default 30; quick 3)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed steps first (default 5; quick 1)")
    ap.add_argument("--batch", type=int, default=0, help="sequences per step (default 16; quick 2)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default 1024; quick 128)")
    ap.add_argument("--gen-tokens", type=int, default=0, help="tokens generated per row (default 128; quick 16)")
    ap.add_argument("--no-compile", action="store_true", help="eager training (torch.compile is on by default)")
    args = ap.parse_args()
    q = args.quick
    preset = "demo" if q else "seed-0.1b"
    steps, warmup = args.steps or (3 if q else 30), args.warmup or (1 if q else 5)
    batch, seq_len = args.batch or (2 if q else 16), args.seq_len or (128 if q else 1024)
    gen_tokens = args.gen_tokens or (16 if q else 128)
    compile_ = not (q or args.no_compile)
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    vocab = 32006   # the seed's 32k vocabulary + special tokens (no tokenizer is trained here)
    cfg = model_config_from(config.load_preset(preset).model, vocab)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq_len + gen_tokens + 8)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    opt = build_optimizer(model, LoopSettings(lr=1e-4), dev)
    train_model = torch.compile(model) if compile_ else model
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(dev) for _ in range(4)]

    def step(i: int) -> None:
        x = data[i % len(data)]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = lm_loss(train_model, x[:, :-1], x[:, 1:])[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for i in range(warmup):
        step(i)
    sync(dev)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync(dev)
    train_s = time.perf_counter() - t
    tokens_per_s = steps * batch * seq_len / train_s
    # the peak table and the FLOPs formula are the training loop's own
    peak = gpu_peak_bf16(device_name(dev)) if dev.type == "cuda" else None
    fpt = cfg.flops_per_token(seq_len)
    mfu = tokens_per_s * fpt / peak if peak else None
    train_peak_mb = peak_mem_mb(dev)

    model.eval()
    gen = {}
    for b in (1, 32):
        prompts = [data[0][i % batch, :16].tolist() for i in range(b)]
        generate(model, prompts[:1], max_new_tokens=4, temperature=0)   # warm-up
        sync(dev)
        t = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=gen_tokens, temperature=0)
        sync(dev)
        gen[b] = sum(len(o.tokens) for o in out) / (time.perf_counter() - t)
        sample = out[0].tokens[:24]
    res = {
        "device": device_name(dev), "model": preset, "params": params, "seq_len": seq_len, "batch": batch,
        "steps": steps, "compiled": compile_, "precision": "bf16",
        "tokens_per_s": round(tokens_per_s, 1), "flops_per_token": fpt,
        "peak_bf16_flops": peak, "mfu": round(mfu, 4) if mfu is not None else None,
        "peak_mem_mb": round(train_peak_mb, 1), "warmup_s": round(warm_s, 1),
        "gen_tokens_per_s_b1": round(gen[1], 1), "gen_tokens_per_s_b32": round(gen[32], 1),
        "gen_tokens": gen_tokens, "sample_token_ids": sample,
    }
    print(f"{preset} ({params / 1e6:.0f}M parameters) on {res['device']}: {tokens_per_s:,.0f} tokens/s"
          + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (no bf16 peak for this device)")
          + f", peak memory {train_peak_mb:,.0f} MB; generation {gen[1]:,.0f} tokens/s at batch 1, "
          f"{gen[32]:,.0f} at batch 32; sample ids {sample}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
