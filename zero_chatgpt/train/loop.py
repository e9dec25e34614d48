"""THE training loop: every stage that trains weights (pretrain, SFT, reward model, DPO) runs here.

A stage is a thin recipe that builds a model and hands the loop three seams:

* ``batches(step, micro, rank, world) -> batch``: the batch source. It must be a *pure
  function* of its arguments (plus the stage's seed), so a resumed run sees exactly the
  batches the uninterrupted run would have seen. ``micro`` counts the gradient-accumulation
  micro-batches of one optimizer step (0 .. grad_accum-1). A batch is anything ``loss_fn``
  understands; tensors in it (also inside dicts / tuples / lists) are moved to the device
  by the loop. A source that cannot be pure may expose ``state_dict()`` /
  ``load_state_dict(d)``; the loop saves that in the checkpoint as the data position.
* ``loss_fn(model, batch) -> (loss, metrics, n)``: ``loss`` is the *mean* over the batch's
  ``n`` targets (tokens for LM/SFT, pairs for RM/DPO); ``metrics`` a dict of floats (or 0-d
  tensors) to log, averaged over micro-batches weighted by ``n``. The loop weighs each
  micro-batch by ``n`` across micro-batches *and ranks*, so the step optimizes the exact
  mean over every target of the global batch, whatever the padding (see ``_scale_grads``).
  ``model`` is the wrapped model (DDP / compiled): call it, do not reach into it.
* ``eval_fn(model) -> dict`` (optional): called every ``eval_every`` steps and at the end,
  on every rank, under ``torch.no_grad()`` with the unwrapped model in eval mode; rank 0's
  result is logged (keys as given, e.g. ``val_loss``).

and a ``LoopSettings`` read from the stage's config section. Every training section
(``[pretrain]``, ``[sft]``, ...) carries the same keys, documented in defaults.toml:
``max_steps lr min_lr_ratio warmup_steps schedule decay_fraction weight_decay beta1 beta2
grad_clip precision compile checkpoint_every keep_last eval_every log_every init_from fsdp``;
the stage computes ``grad_accum`` (from its token batch size) and passes it in.

What the loop does: AdamW (β = 0.9, 0.95; decay on matrices only), warmup then cosine or
warmup-stable-decay to a floor, gradient accumulation, norm clipping, fp32 or bf16 autocast,
optional torch.compile, DDP (or FSDP2) under torchrun with only rank 0 writing, logs
(console progress bar, ``logs/<stage>.jsonl``, TensorBoard ``logs/tb/<stage>/``), atomic
checkpoints every ``checkpoint_every`` steps keeping the last K, and automatic resume from
the newest complete checkpoint: batches are pure functions of the step, and the weights,
optimizer moments, step and RNG states are restored, so the resumed losses are bitwise
those of an uninterrupted run (on CPU in fp32; tests/test_loop_resume.py kills a run with
SIGKILL to check).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from zero_chatgpt import checkpoint as ckpt
from zero_chatgpt.console import UserError, info, progress, table

BatchSource = Callable[[int, int, int, int], Any]
LossFn = Callable[[torch.nn.Module, Any], tuple]
EvalFn = Callable[[torch.nn.Module], dict]


@dataclass
class LoopSettings:
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # the schedule's floor, as a share of lr
    warmup_steps: int = 100
    schedule: str = "cosine"         # cosine | wsd | constant
    decay_fraction: float = 0.2      # wsd: the last share of steps that decays to the floor
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # 0 = off
    grad_accum: int = 1
    precision: str = "auto"          # auto | fp32 | bf16
    compile: bool = False
    checkpoint_every: int = 500      # 0 = only at the end
    keep_last: int = 2
    eval_every: int = 200            # 0 = only at the end
    log_every: int = 10
    init_from: str = ""
    fsdp: bool = False
    seed: int = 1234
    tensorboard: bool = True

    @classmethod
    def from_section(cls, section: dict, **overrides) -> "LoopSettings":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in section.items() if k in names}
        kw.update(overrides)
        s = cls(**kw)
        if s.schedule not in ("cosine", "wsd", "constant"):
            raise UserError(f"schedule must be cosine, wsd or constant, got {s.schedule!r}")
        if s.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"precision must be auto, fp32 or bf16, got {s.precision!r}")
        return s


def lr_at(step: int, s: LoopSettings) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine
    (Loshchilov & Hutter 2016) or warmup-stable-decay (Hu et al. 2024, MiniCPM,
    arXiv:2404.06395) down to lr * min_lr_ratio."""
    floor = s.lr * s.min_lr_ratio
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "wsd":
        decay_start = int(s.max_steps * (1 - s.decay_fraction))
        if step < decay_start:
            return s.lr
        frac = (step - decay_start) / max(1, s.max_steps - decay_start)
        return s.lr - (s.lr - floor) * min(1.0, frac)
    frac = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return floor + 0.5 * (s.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


# ---------------------------------------------------------------- device, precision, distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; start the process group (gloo on CPU, NCCL on GPU) once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("run.device = cuda but no CUDA device is available; use --set run.device=\"cpu\"")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where it is measured to be faster, fp32 elsewhere.

    CUDA with bf16 support: bf16. CPU: bf16 only with AMX tile units (Sapphire Rapids and
    later), where bench/train_speed.py measured bf16 autocast faster than fp32 for our
    models; without AMX, bf16 autocast on CPU is emulated and slower.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_amx() else "fp32"


def cpu_has_amx() -> bool:
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False


_PEAK_CACHE: dict = {}


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s for the MFU estimate: datasheet dense figures for known GPUs; on CPU the
    theoretical vector peak (cpu_peak_flops)."""
    key = (device.type, precision)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table_ = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A40": 150e12, "L40": 181e12, "4090": 165e12}
        peak = next((v for k, v in table_.items() if k in name), 100e12)
        if precision == "fp32":
            peak /= 2   # TF32 tensor cores
    else:
        peak = cpu_peak_flops(precision)
    _PEAK_CACHE[key] = peak
    return peak


def cpu_peak_flops(precision: str) -> float:
    """Theoretical CPU peak: threads x clock x FLOPs per cycle per core (two FMA units of
    the widest vector ISA; AMX tiles for bf16). A measured matmul rate would be lower
    whenever other processes share the cores, and make MFU read above 100%."""
    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = max(float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    cap = ""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    per_cycle = 64 if "AVX512" in cap else 32 if "AVX2" in cap else 16   # fp32: 2 FMA x lanes x 2
    if precision == "bf16":
        per_cycle = 1024 if "AMX" in cap else per_cycle * 2
    return torch.get_num_threads() * (mhz or 2000.0) * 1e6 * per_cycle


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def build_optimizer(model: torch.nn.Module, s: LoopSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear + embedding weights) only; norms' gains
    are not decayed (as GPT-2/LLaMA practice). β = (0.9, 0.95) — the seed ran with β1 = 0.95
    by passing betas twice."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and not s.fsdp
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, fused=fused)


# ---------------------------------------------------------------- logging

class Logger:
    """logs/<stage>.jsonl (+ TensorBoard), rank 0 only. On resume, records after the resumed
    step are dropped so the log reads as one uninterrupted run."""

    def __init__(self, log_dir: Path, stage: str, start_step: int, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(log_dir) / f"{stage}.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass   # a line cut by a kill
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        self.fh = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(log_dir) / "tb" / stage), purge_step=start_step)
            except Exception as e:   # tensorboard missing or broken: the jsonl log still has everything
                info(f"tensorboard logging off ({type(e).__name__}: {e})")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        if self.tb is not None:
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


# ---------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    step: int
    final: Path | None
    last_loss: float
    evals: list[dict]
    tokens: int
    seconds: float
    precision: str
    resumed_from: int


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _full_state(raw: torch.nn.Module, optimizer, s: LoopSettings):
    """Full (unsharded) model and optimizer state dicts on CPU."""
    if s.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw.state_dict(), (optimizer.state_dict() if optimizer is not None else None)


def _load_optimizer_state(raw, optimizer, optim_state, s: LoopSettings) -> None:
    if s.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(raw, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(optim_state)


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def train(settings: LoopSettings, *, model: torch.nn.Module, stage: str, stage_dir: Path, log_dir: Path,
          batches: BatchSource, loss_fn: LossFn, eval_fn: EvalFn | None = None, dist_info: Dist | None = None,
          tokens_per_step: int = 0, flops_per_token: float = 0.0, meta: dict | None = None) -> TrainResult:
    """Train `model` (built on CPU, fp32) for settings.max_steps optimizer steps; resume if a
    checkpoint exists in stage_dir; write stage_dir/final. Returns a TrainResult."""
    s = settings
    d = dist_info or setup_distributed()
    device = d.device
    precision = resolve_precision(s.precision, device)
    stage_dir = Path(stage_dir)
    if d.main:
        ckpt.clean_partial(stage_dir)
    if d.world > 1:
        dist.barrier()

    # --- weights: resume > init_from > the model as built
    latest = ckpt.latest_checkpoint(stage_dir)
    start_step, state = 0, None
    if latest is not None:
        saved_cfg = ckpt.read_model_config(latest)
        if saved_cfg != model.config:
            raise UserError(f"{latest}: checkpoint was trained with a different model config; "
                            f"rerun with --force to start over (this deletes {stage_dir})")
        ckpt.load_weights(model, latest)
        state = ckpt.load_trainer_state(latest)
        start_step = int(state["step"])
        info(f"{stage}: resuming from {latest} (step {start_step})")
    elif s.init_from:
        try:
            ckpt.load_weights(model, s.init_from)
        except RuntimeError as e:
            raise UserError(f"init_from {s.init_from}: weights do not fit the model: {str(e)[:300]}") from None
        info(f"{stage}: initialized from {s.init_from}")
    if state is None:
        torch.manual_seed(s.seed + d.rank)

    model.to(device)
    raw = model
    if s.fsdp:
        if d.world == 1:
            info("fsdp=true with one process: plain training")
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in raw.model.layers:
                fully_shard(layer)
            fully_shard(raw)
    if s.compile:
        raw.compile()
    wrapped = raw
    if d.world > 1 and not s.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(raw, s, device)
    if state is not None:
        _load_optimizer_state(raw, optimizer, state["optimizer"], s)
        _set_rng_state(state["rng"], device)
        if hasattr(batches, "load_state_dict") and state.get("data") is not None:
            batches.load_state_dict(state["data"])

    logger = Logger(log_dir, stage, start_step, d.main, s.tensorboard)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    peak = peak_flops(device, precision) if (flops_per_token and d.main) else 0.0
    evals: list[dict] = [] if state is None else list(state.get("evals", []))
    last_loss = float("nan")
    tokens_seen = int(state.get("tokens", 0)) if state else 0
    seconds_before = float(state.get("seconds", 0.0)) if state else 0.0   # training time of earlier segments

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        raw.eval()
        with torch.no_grad(), autocast:
            res = eval_fn(raw)
        raw.train()
        rec = {"step": step, **{k: float(v) for k, v in res.items()}}
        evals.append(rec)
        logger.write({"kind": "eval", **rec})

    def save(step: int, name: str) -> None:
        model_state, optim_state = _full_state(raw, optimizer, s)
        if d.main:
            trainer_state = {"step": step, "optimizer": optim_state, "rng": _rng_state(device), "tokens": tokens_seen,
                             "seconds": seconds_before + time.perf_counter() - t_start,
                             "data": batches.state_dict() if hasattr(batches, "state_dict") else None,
                             "evals": evals}
            ckpt.save_checkpoint(stage_dir, name, model_state=model_state, cfg=raw.config,
                                 trainer_state=trainer_state,
                                 meta={"stage": stage, "step": step, "loss": last_loss, "tokens": tokens_seen,
                                       "evals": evals[-1:], **(meta or {})},
                                 keep_last=s.keep_last if name.startswith("step-") else 0)
        if d.world > 1:
            dist.barrier()

    raw.train()
    t_start = time.perf_counter()
    bar = progress(total=s.max_steps, initial=start_step, desc=stage, unit="step")
    step = start_step
    t_last, tok_last = time.perf_counter(), tokens_seen
    try:
        for step in range(start_step, s.max_steps):
            lr = lr_at(step, s)
            for g in optimizer.param_groups:
                g["lr"] = lr
            sums = torch.zeros(2, dtype=torch.float64)   # loss * n, n
            msums: dict[str, float] = {}
            for micro in range(s.grad_accum):
                batch = _to_device(batches(step, micro, d.rank, d.world), device)
                sync = micro == s.grad_accum - 1 or d.world == 1 or s.fsdp
                ctx = wrapped.no_sync() if not sync else _nullcontext()
                with ctx:
                    with autocast:
                        loss, metrics, n = loss_fn(wrapped, batch)
                    (loss * n).backward()
                sums[0] += float(loss.detach()) * n
                sums[1] += n
                for k, v in (metrics or {}).items():
                    msums[k] = msums.get(k, 0.0) + float(v) * n
            if d.world > 1:
                packed = torch.tensor([sums[0].item(), sums[1].item(), *msums.values()], dtype=torch.float64,
                                      device=device)
                dist.all_reduce(packed)
                sums[0], sums[1] = packed[0].item(), packed[1].item()
                msums = dict(zip(msums, packed[2:].tolist()))
            n_total = max(float(sums[1]), 1.0)
            _scale_grads(raw, d.world / n_total)
            gnorm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), s.grad_clip if s.grad_clip > 0 else 1e30))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = float(sums[0]) / n_total
            tokens_seen += tokens_per_step
            done = step + 1
            bar.update(1)
            if done % s.log_every == 0 or done == s.max_steps or done == start_step + 1:
                now = time.perf_counter()
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens_seen
                rec = {"kind": "train", "step": done, "loss": last_loss, "lr": lr, "grad_norm": gnorm,
                       "tokens": tokens_seen, "tokens_per_s": tps,
                       **{k: v / n_total for k, v in msums.items()}}
                if peak:
                    rec["mfu"] = flops_per_token * tps / peak
                logger.write(rec)
                bar.set_postfix(loss=f"{last_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}")
            if s.eval_every and done % s.eval_every == 0 and done < s.max_steps:
                run_eval(done)
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.max_steps:
                save(done, f"step-{done}")
        step = s.max_steps
        if not evals or evals[-1]["step"] != step:
            run_eval(step)
        save(step, f"step-{step}")
        save(step, "final")
    finally:
        bar.close()
        logger.close()
    seconds = seconds_before + time.perf_counter() - t_start
    return TrainResult(step=step, final=stage_dir / "final", last_loss=last_loss, evals=evals,
                       tokens=tokens_seen, seconds=seconds, precision=precision, resumed_from=start_step)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _scale_grads(model: torch.nn.Module, factor: float) -> None:
    """Turn the accumulated sum of n_i * grad(mean loss_i) (averaged over ranks by DDP) into
    the gradient of the mean loss over every target of the global batch."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


def summary_rows(result: TrainResult) -> list[list]:
    rows = [["steps", result.step], ["resumed from step", result.resumed_from], ["tokens", result.tokens],
            ["final train loss", result.last_loss], ["precision", result.precision],
            ["time (s)", result.seconds]]
    if result.evals:
        for k, v in result.evals[-1].items():
            if k != "step":
                rows.append([k, v])
    return rows


def print_summary(stage: str, result: TrainResult) -> None:
    table(["", stage], summary_rows(result), title=f"{stage}: done → {result.final}")
