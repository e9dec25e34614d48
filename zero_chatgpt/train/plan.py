"""`zero-chatgpt plan --preset P [--gpus N] [--gpu NAME] [--mfu X] [--json]`: what a run will cost, before
anything runs.

From the config alone (the preset, the run's saved config.toml, --set): parameters, tokens, optimizer steps and
training FLOPs per trained stage; the time each takes on N GPUs of the named kind at an assumed model FLOPs
utilization (MFU; the peak is core/runtime.GPU_PEAK_BF16, the table behind the loop's own MFU); the memory one
GPU needs (weights, gradients, optimizer state, activations of one micro-batch), with DDP and with FSDP, and
whether it fits the card; the disk for token shards and checkpoints. Where a stage does not fit, it names the
key to change and the value that fits.

FLOPs per trained token are the model's own (ModelConfig.flops_per_token: 6 x the matmul parameters + causal
attention, Kaplan et al. 2020 / PaLM appendix B); a forward only is a third of that. Sampling (PPO and GRPO
rollouts) is counted as forward FLOPs of every generated token; decoding runs far below the matmul peak, so the
rollout time is a lower bound. Activation memory follows Korthikanti et al. 2022 (arXiv:2205.05198) for the
layers this model has (SwiGLU MLP, fused attention that stores no score matrix, RMSNorm in fp32), no
recomputation; the loss is chunked (model/losses.py), so no full logits tensor is held.
"""
from __future__ import annotations

import json
import math

from zero_chatgpt.core.console import info, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.registry import PIPELINE
from zero_chatgpt.core.runtime import GPU_PEAK_BF16, gpu_peak_bf16
from zero_chatgpt.core.settings import Config
from zero_chatgpt.model.transformer import ModelConfig, model_config_from

# Memory of each card in GB (10^9 bytes, as sold); the first name contained in --gpu wins.
GPU_MEMORY_GB = (
    ("H100 NVL", 94), ("H100", 80), ("H200", 141), ("H800", 80), ("GH200", 96), ("B200", 192),
    ("A100-40", 40), ("A100", 80), ("A800", 80), ("A10G", 24), ("A10", 24), ("A40", 48), ("L40S", 48),
    ("L40", 48), ("L4", 24), ("4090", 24), ("3090", 24), ("V100", 32), ("T4", 16),
)
RESERVED_GB = 2.0      # what the CUDA context, the allocator's slack and NCCL buffers take before any tensor


def gpu_memory_gb(name: str) -> float | None:
    return next((float(g) for n, g in GPU_MEMORY_GB if n.lower() in name.lower()), None)


def activation_bytes(m: ModelConfig, rows: int, seq: int, bf16: bool = True) -> float:
    """Activations one micro-batch of `rows` x `seq` tokens keeps for the backward pass (Korthikanti et al. 2022,
    adapted to this block, no recomputation). Per layer and token: the two RMSNorms' inputs and normalized
    outputs (fp32 under autocast too), q/k/v before and after RoPE, the attention output and what the fused
    attention keeps, the out-projection's input, the MLP's input, and gate, up, silu(gate) and their product
    (intermediate width). Outside the layers, per token: the embedding output, the final norm, the hidden states
    and gradient the fused loss keeps (fp32); and one chunk of fp32 logits (model/losses.py). Checked against
    the peak memory of training steps on CPU in fp32 (tests/train/test_plan.py)."""
    e = 2 if bf16 else 4
    h, i, kv = m.hidden_size, m.intermediate_size, m.num_key_value_heads * m.head_dim
    layer = 4 * 4 * h + e * (2 * (h + 2 * kv) + 4 * h + h + 4 * i)
    outside = 4 * 20 * h
    loss_chunk = 3 * 1024 * m.vocab_size * 4
    return rows * seq * (m.num_hidden_layers * layer + outside) + loss_chunk


def state_bytes(params: int, optimizer: str) -> dict[str, float]:
    """Weights, gradients and optimizer state in bytes: fp32 master weights and gradients (autocast computes
    in bf16 and keeps them fp32), AdamW's two moments, or Muon's one momentum (AdamW for the rest, which
    this counts as Muon's: the blocks' matrices are nearly all of a model's parameters)."""
    return {"weights": 4.0 * params, "gradients": 4.0 * params,
            "optimizer": (4.0 if optimizer == "muon" else 8.0) * params}


def _stage_rows(cfg: Config, m: ModelConfig) -> list[dict]:
    """Per trained stage: steps, trained tokens (or rows x length), FLOPs, micro-batch shape."""
    p, s, rm, dpo, ppo, grpo, rl = (cfg.section(k) for k in ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "rl"))
    fwd_bwd = m.flops_per_token
    out = []
    seq = p.seq_len
    tokens = p.max_steps * p.batch_tokens
    out.append({"stage": "pretrain", "steps": p.max_steps, "tokens": tokens,
                "flops": fwd_bwd(seq) * tokens, "rows": p.micro_batch_size, "seq": seq,
                "batch_key": "pretrain.micro_batch_size", "section": p})
    seq = min(s.max_seq_len, m.max_position_embeddings)
    tokens = s.max_steps * s.batch_tokens       # padded rows included: what the GPU computes
    out.append({"stage": "sft", "steps": s.max_steps, "tokens": tokens, "flops": fwd_bwd(seq) * tokens,
                "rows": max(1, s.micro_batch_tokens // seq), "seq": seq,
                "batch_key": "sft.micro_batch_tokens", "section": s})
    for name, sec, ref_forward in (("rm", rm, 0.0), ("dpo", dpo, 1 / 3)):
        seq = min(sec.max_seq_len, m.max_position_embeddings)
        tokens = sec.max_steps * sec.batch_pairs * 2 * seq        # at most: every row full
        out.append({"stage": name, "steps": sec.max_steps, "tokens": tokens,
                    "flops": fwd_bwd(seq) * tokens * (1 + ref_forward), "rows": 2 * sec.micro_batch_pairs,
                    "seq": seq, "batch_key": f"{name}.micro_batch_pairs", "section": sec})
    new = rl.max_new_tokens
    seq = min(m.max_position_embeddings, 2 * new + 64)          # an RL prompt (a question) + its answer
    for name, sec, group in (("ppo", ppo, 1), ("grpo", grpo, grpo.samples_per_prompt)):
        updates = sec.epochs * sec.minibatches
        rollouts = -(-sec.max_steps // updates)
        answers = sec.prompts_per_rollout * group
        gen_tokens = rollouts * answers * new
        train_tokens = rollouts * sec.epochs * answers * seq
        # sampling + the policy's and the reference's log-probs (+ PPO's critic) are forwards; the updates train
        forwards = gen_tokens + rollouts * answers * seq * (3 if name == "ppo" else 2)
        flops = fwd_bwd(seq) * (train_tokens * (2 if name == "ppo" else 1) + forwards / 3)
        out.append({"stage": name, "steps": sec.max_steps, "tokens": train_tokens, "flops": flops,
                    "rows": max(1, answers // sec.minibatches), "seq": seq,
                    "batch_key": f"{name}.minibatches", "section": sec, "generated": gen_tokens})
    return out


def plan(cfg: Config, *, gpus: int = 1, gpu: str = "H100", mfu: float = 0.4) -> dict:
    """The whole estimate as a dict (what --json prints)."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu}: a share of the peak, in (0, 1]")
    peak = gpu_peak_bf16(gpu)
    mem_gb = gpu_memory_gb(gpu)
    if peak is None or mem_gb is None:
        known = ", ".join(n for n, _ in GPU_PEAK_BF16 if gpu_memory_gb(n))
        raise UserError(f"--gpu {gpu!r}: unknown card; name one of {known}")
    m = model_config_from(cfg.model, cfg.tokenizer.vocab_size)
    params = m.num_params()
    stages = {}
    for r in _stage_rows(cfg, m):
        sec = r["section"]
        opt = sec.optimizer
        st = state_bytes(params * (2 if r["stage"] == "ppo" else 1), opt)     # PPO trains a critic beside
        frozen = 2.0 * params * {"dpo": 1, "ppo": 2, "grpo": 1}.get(r["stage"], 0)   # bf16 reference (+ RM)
        bf16 = sec.precision != "fp32"
        act = activation_bytes(m, r["rows"], r["seq"], bf16)
        ddp = sum(st.values()) + frozen + act
        fsdp = sum(st.values()) / gpus + frozen + act
        need = (fsdp if sec.fsdp else ddp) / 1e9 + RESERVED_GB
        seconds = r["flops"] / (peak * mfu * gpus)
        row = {"steps": r["steps"], "tokens": r["tokens"], "flops": r["flops"], "seconds": seconds,
               "micro_batch": [r["rows"], r["seq"]], "optimizer": opt,
               "memory_gb": {"weights": st["weights"] / 1e9, "gradients": st["gradients"] / 1e9,
                             "optimizer": st["optimizer"] / 1e9, "frozen_models": frozen / 1e9,
                             "activations": act / 1e9, "ddp": ddp / 1e9 + RESERVED_GB,
                             "fsdp": fsdp / 1e9 + RESERVED_GB},
               "fits": need <= mem_gb}
        if "generated" in r:
            row["generated_tokens"] = r["generated"]
        if not row["fits"]:
            row["fix"] = _fix(r, need, act, mem_gb)
        stages[r["stage"]] = row
    shard_bytes = 2 if m.vocab_size <= 65536 else 4
    corpus_tokens = stages["pretrain"]["tokens"]
    ckpt_gb = (4.0 + 8.0) * params / 1e9          # weights + AdamW moments; final/ holds the weights only
    keep = cfg.pretrain.keep_last
    return {
        "gpu": gpu, "gpus": gpus, "mfu": mfu, "peak_flops_per_gpu": peak,
        "gpu_memory_gb": mem_gb, "params": params, "flops_per_token": m.flops_per_token(cfg.pretrain.seq_len),
        "stages": stages,
        "total_hours": sum(s["seconds"] for s in stages.values()) / 3600,
        "disk_gb": {"token_shards": corpus_tokens * shard_bytes / 1e9,
                    "pretrain_checkpoints": ckpt_gb * keep + 4.0 * params / 1e9,
                    "per_checkpoint": ckpt_gb},
        "measured_here": "nothing: every figure is an estimate from the config (FLOPs and memory by formula, "
                         "time at the assumed MFU)",
    }


def _fix(r: dict, need_gb: float, act: float, mem_gb: float) -> str:
    """The key to change so the stage fits: fewer rows per micro-batch (the same global batch, more
    accumulation), else FSDP."""
    spare = mem_gb - (need_gb - act / 1e9)
    if spare > 0 and r["rows"] > 1:
        rows = max(1, int(r["rows"] * spare / (act / 1e9)))
        while rows > 1 and r["rows"] % rows:
            rows -= 1
        value = {"pretrain.micro_batch_size": rows, "sft.micro_batch_tokens": rows * r["seq"],
                 "rm.micro_batch_pairs": max(1, rows // 2), "dpo.micro_batch_pairs": max(1, rows // 2)}.get(r["batch_key"])
        if value is not None:
            return f"--set {r['batch_key']}={value} (the global batch stays; accumulation grows)"
        more = r["section"].minibatches * math.ceil(r["rows"] / rows)
        return f"--set {r['batch_key']}={more} (smaller minibatches: more optimizer steps per rollout)"
    if not r["section"].get("fsdp") and r["stage"] in ("pretrain", "sft", "rm", "dpo"):
        return f"--set {r['stage']}.fsdp=true (shards weights, gradients and optimizer state across the GPUs)"
    return "a card with more memory"


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h" if s >= 360 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def run_command(ctx) -> None:
    a = ctx.args
    res = plan(ctx.cfg, gpus=int(a.get("gpus") or 1), gpu=str(a.get("gpu") or "H100"), mfu=float(a.get("mfu") or 0.4))
    if a.get("json"):
        print(json.dumps(res))
        return
    trained = [st.name for st in PIPELINE if st.trained and st.name in res["stages"]]
    rows = []
    for name in trained:
        s = res["stages"][name]
        mg = s["memory_gb"]
        rows.append([name, f"{s['steps']:,}", f"{s['tokens'] / 1e9:.3g}B", f"{s['flops']:.3g}", _hours(s["seconds"]),
                     f"{mg['ddp']:.1f}", f"{mg['fsdp']:.1f}", "yes" if s["fits"] else "NO: " + s["fix"]])
    table(["stage", "steps", "tokens", "FLOPs", f"time at {res['mfu']:.0%} MFU", "GB/GPU (DDP)", "GB/GPU (FSDP)",
           f"fits {res['gpu_memory_gb']:g} GB"], rows,
          title=f"plan: {res['params'] / 1e6:.1f}M parameters on {res['gpus']} x {res['gpu']} "
                f"({res['peak_flops_per_gpu'] / 1e12:g} TFLOP/s bf16 peak each)")
    d = res["disk_gb"]
    info(f"total training time ~{_hours(res['total_hours'] * 3600)}; disk: token shards {d['token_shards']:.1f} GB, "
         f"pretrain checkpoints {d['pretrain_checkpoints']:.1f} GB ({d['per_checkpoint']:.2f} GB each)")
    info("estimates from the config: FLOPs and memory by formula, time at the assumed MFU (RL rollouts decode below "
         "it: their time is a lower bound); the data and tokenizer stages run on CPUs and are not in this table")
