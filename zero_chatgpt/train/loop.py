"""THE training loop: every stage that trains weights (pretrain, SFT, reward model, DPO, PPO, GRPO) runs here.

A stage is a thin recipe that builds its model(s) and hands the loop three seams:

* ``batches(step, micro, rank, world) -> batch``: the batch source. It must be a *pure
  function* of its arguments (plus the stage's seed), so a resumed run sees exactly the
  batches the uninterrupted run would have seen. ``micro`` counts the gradient-accumulation
  micro-batches of one optimizer step (0 .. grad_accum-1). A batch is anything ``loss_fn``
  understands; tensors in it (also inside dicts / tuples / lists) are moved to the device
  by the loop. A source that cannot be pure may expose ``state_dict()`` /
  ``load_state_dict(d)``; the loop saves that in the checkpoint as the data position.
  A source may also expose ``stop_before(step) -> str | None``: a reason ends the run
  there (RL's KL budget); the same on every rank.
* ``loss_fn(model, batch) -> (loss, metrics, n)``: ``loss`` is the *mean* over the batch's
  ``n`` targets (tokens for LM/SFT, pairs for RM/DPO); ``metrics`` a dict of floats (or 0-d
  tensors) to log, averaged over micro-batches weighted by ``n``. The loop weighs each
  micro-batch by ``n`` across micro-batches *and ranks*, so the step optimizes the exact
  mean over every target of the global batch, whatever the padding (see ``_scale_grads``).
  ``model`` is the wrapped model (DDP / compiled): call it, do not reach into it; what the loss
  needs comes back through ``model(ids, output=...)`` (model/losses.py: LMLoss, TokenLogProbs,
  ScalarValues). With ``extra_models`` (e.g. a PPO critic), ``loss_fn`` gets a dict
  ``{"model": primary, name: ...}`` of wrapped models instead; one backward fills every
  model's gradients, and each has its own optimizer, learning rate and clipping.
* ``eval_fn(model) -> dict`` (optional): called every ``eval_every`` steps and at the end,
  on every rank, under ``torch.no_grad()`` with the unwrapped model in eval mode; rank 0's
  result is logged (keys as given, e.g. ``val_loss``).

and a ``LoopSettings`` read from the stage's config section. Every training section
(``[pretrain]``, ``[sft]``, ...) carries the same keys, those of core/train_settings.TrainingSection
(``max_steps lr min_lr_ratio warmup_steps schedule ... init_from``, each with its default and help);
the stage computes ``grad_accum`` (from its token batch size) and passes it in.

What the loop does: AdamW (β = 0.9, 0.95; decay on matrices only), warmup then cosine or
warmup-stable-decay to a floor, gradient accumulation, norm clipping, fp32 or bf16 autocast,
optional torch.compile, DDP (or FSDP2) under torchrun with only rank 0 writing, logs
(console progress bar, ``logs/<stage>.jsonl``, TensorBoard ``logs/tb/<stage>/``), atomic
checkpoints every ``checkpoint_every`` steps keeping the last K, and automatic resume from
the newest intact checkpoint: batches are pure functions of the step, and the weights,
optimizer moments, step and every rank's RNG state (and data position) are restored, so the
resumed losses are bitwise those of an uninterrupted run (on CPU in fp32;
tests/train/test_loop_resume.py kills a run with SIGKILL to check). A raised ``max_steps`` resumes
a finished run from its last checkpoint the same way.

The loop is four named parts around one ``TrainState``: ``_restore`` (weights, optimizers,
RNG, counters from the newest checkpoint), ``_wrap`` (device, FSDP / compile / DDP,
optimizers), ``_step`` (one optimizer step over the accumulation micro-batches and ranks)
and ``_save`` (a checkpoint; ``final`` holds the models only).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info, progress
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.runtime import Dist, cpu_group, gather_to_all, peak_flops, resolve_precision, setup_distributed
from zero_chatgpt.core.settings import RunSection
from zero_chatgpt.core.train_settings import TrainingSection
from zero_chatgpt.train.loop_state import (
    PRIMARY,
    Member,
    TrainState,
    load_optimizer_state,
    restore,
    save,
    set_rng_state,
)
from zero_chatgpt.train.optim import WeightEMA, build_optimizer
from zero_chatgpt.train.train_log import Logger, TrainResult

BatchSource = Callable[[int, int, int, int], Any]
LossFn = Callable[[torch.nn.Module, Any], tuple]
EvalFn = Callable[[torch.nn.Module], dict]


def grad_accum(batch: int, per_micro: int, world: int) -> int:
    """Micro-batches per rank in one optimizer step, for a global batch of `batch` units (tokens, pairs) and
    `per_micro` units per micro-batch on each of `world` ranks; at least 1."""
    return max(1, int(batch) // (int(per_micro) * world))


@dataclass
class LoopSettings(TrainingSection):
    """The loop's settings: a training section's keys (core/train_settings.TrainingSection: their defaults, help and
    checks live there, and config.validate checks them before a stage starts) and what the stage adds."""
    grad_accum: int = 1              # micro-batches per optimizer step (the stage computes it: grad_accum())
    seed: int = RunSection.seed
    schedule_steps: int = 0          # the steps the lr schedule spans (0 = max_steps); a continued run
                                     # keeps its first run's, and trains the added steps at the floor
    select_metric: str = ""          # an eval_fn key to maximize: the best evaluated step (after step 0)
                                     # becomes final/, not the last (RL keeps its best-by-gold checkpoint)
    select_gate: str = ""            # an eval_fn key: a trained step is a candidate only when it is above 0 (RL: the
                                     # lower end of its gold gain's interval over the start, alignment.gold_eval)
    eval_at_start: bool = False      # also evaluate before the first step (the curve starts at the SFT model)
    select_from_start: bool = False  # with eval_at_start: the starting weights are a candidate too, so when
                                     # no trained step beats them, final/ holds them (RL never ships a model
                                     # worse on its held-out metric than the SFT model it started from)

    @classmethod
    def from_section(cls, section: TrainingSection, **overrides) -> "LoopSettings":
        return cls(**{**section.loop_values(), **overrides})


def lr_at(step: int, s: LoopSettings) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine
    (Loshchilov & Hutter 2016) or warmup-stable-decay (Hu et al. 2024, MiniCPM,
    arXiv:2404.06395) down to lr * min_lr_ratio, over schedule_steps (default max_steps); past
    them, the floor (a run continued with a raised max_steps goes on at its final rate rather than
    jumping back up the curve)."""
    total = s.schedule_steps or s.max_steps
    floor = s.lr * s.min_lr_ratio
    if s.warmup_steps > 0 and step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "wsd":
        decay_start = int(total * (1 - s.decay_fraction))
        if step < decay_start:
            return s.lr
        frac = (step - decay_start) / max(1, total - decay_start)
        return s.lr - (s.lr - floor) * min(1.0, frac)
    frac = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return floor + 0.5 * (s.lr - floor) * (1 + math.cos(math.pi * min(1.0, frac)))


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------- logging


# ---------------------------------------------------------------- the state and its parts


def _wrap(members: list[Member], state: dict | None, batches, d: Dist) -> None:
    """Device, FSDP2 / compile / DDP, optimizers; then the saved optimizer, RNG and data state."""
    device = d.device
    for m in members:
        s = m.settings
        m.raw.to(device)
        if s.fsdp:
            if d.world == 1:
                info("fsdp=true with one process: plain training")
            else:
                for layer in m.raw.model.layers:
                    fully_shard(layer)
                fully_shard(m.raw)
        if s.compile:
            m.raw.compile()
        m.wrapped = m.raw
        if d.world > 1 and not s.fsdp:
            m.wrapped = DDP(m.raw, device_ids=[device.index] if device.type == "cuda" else None)
        m.optimizer = build_optimizer(m.raw, s, device)
    if state is None:
        return
    optim = state["optimizer"]
    for m in members:   # one model: the optimizer state itself; several: by name
        load_optimizer_state(m, optim if len(members) == 1 else optim[m.name])
    ranks = state.get("ranks") or [{"rng": state["rng"], "data": state.get("data")}]
    if len(ranks) != d.world and d.main:
        info(f"resuming with {d.world} process(es) where the checkpoint had {len(ranks)}: data order is the same, "
             f"random streams are not those of an uninterrupted run")
    mine = ranks[d.rank % len(ranks)]
    set_rng_state(mine["rng"], device)
    if hasattr(batches, "load_state_dict") and mine.get("data") is not None:
        batches.load_state_dict(mine["data"])


_NAMES: dict = {}    # the metric names of the last step, agreed by every rank (see _reduce_by_name)


def _reduce_by_name(sums: torch.Tensor, msums: dict[str, float], d: Dist) -> tuple[float, float, dict]:
    """Sum (loss x n, n, metrics x n) over ranks; metrics by name (ranks may log different ones).

    The union of names is gathered only when some rank's names differ from the last step's: one
    tiny all-reduce of a hash says so, instead of pickling names through a gather every step."""
    if d.world == 1:
        return float(sums[0]), float(sums[1]), msums
    mine = tuple(sorted(msums))
    h = int.from_bytes(hashlib.blake2b("\0".join(mine).encode(), digest_size=7).digest(), "little")
    probe = torch.tensor([h, -h], dtype=torch.int64)
    dist.all_reduce(probe, op=dist.ReduceOp.MAX, group=cpu_group())
    same = int(probe[0]) == -int(probe[1]) == _NAMES.get("hash")      # every rank has the cached names
    if not same:
        _NAMES["names"] = sorted(set().union(*gather_to_all(list(mine), d)))
        _NAMES["hash"] = h if int(probe[0]) == -int(probe[1]) else None
    names = _NAMES["names"]
    packed = torch.tensor([float(sums[0]), float(sums[1]), *[msums.get(k, 0.0) for k in names]],
                          dtype=torch.float64, device=d.device)
    dist.all_reduce(packed)
    vals = packed.tolist()
    return vals[0], vals[1], dict(zip(names, vals[2:]))


def _step(step: int, members: list[Member], batches, loss_fn, autocast, d: Dist) -> tuple[float, float, dict, dict]:
    """One optimizer step: accumulate over micro-batches, weigh by targets across ranks, clip each
    model, step each optimizer. Returns (mean loss, targets, mean metrics, grad norms)."""
    primary = members[0]
    accum = primary.settings.grad_accum
    for m in members:
        lr = lr_at(step, m.settings)
        for g in m.optimizer.param_groups:
            g["lr"] = lr
    target = primary.wrapped if len(members) == 1 else {m.name: m.wrapped for m in members}
    sums = torch.zeros(2, dtype=torch.float64)   # loss * n, n
    msums: dict[str, float] = {}
    for micro in range(accum):
        batch = _to_device(batches(step, micro, d.rank, d.world), d.device)
        sync = micro == accum - 1 or d.world == 1 or primary.settings.fsdp
        ctxs = [m.wrapped.no_sync() for m in members if not sync and hasattr(m.wrapped, "no_sync")]
        with contextlib.ExitStack() as stack:
            for c in ctxs:
                stack.enter_context(c)
            with autocast:
                loss, metrics, n = loss_fn(target, batch)
            (loss * n).backward()
        sums[0] += float(loss.detach()) * n
        sums[1] += n
        for k, v in (metrics or {}).items():
            msums[k] = msums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v) * n
    loss_sum, n_sum, msums = _reduce_by_name(sums, msums, d)
    n_total = max(n_sum, 1.0)
    norms = {}
    for m in members:
        _scale_grads(m.raw, d.world / n_total)
        clip = m.settings.grad_clip if m.settings.grad_clip > 0 else 1e30
        norms[m.name] = float(torch.nn.utils.clip_grad_norm_(m.raw.parameters(), clip))
        m.optimizer.step()
        m.optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_total, n_total, {k: v / n_total for k, v in msums.items()}, norms


def _improved(ts: TrainState, rec: dict, s: LoopSettings, d: Dist) -> bool:
    """Whether this evaluation is the best of select_metric so far (rank 0 decides for all)."""
    candidate = rec["step"] > 0 or s.select_from_start
    if rec["step"] > 0 and s.select_gate and not rec.get(s.select_gate, 0.0) > 0:
        candidate = False
    better = [bool(s.select_metric and candidate and s.select_metric in rec and rec[s.select_metric] > ts.best_value)]
    if d.world > 1:
        dist.broadcast_object_list(better, src=0, group=cpu_group())
    return better[0]


# ---------------------------------------------------------------- the loop

def train(settings: LoopSettings, *, model: torch.nn.Module, stage: str, stage_dir: Path, log_dir: Path,
          batches: BatchSource, loss_fn: LossFn, eval_fn: EvalFn | None = None, dist_info: Dist | None = None,
          tokens_per_step: int = 0, flops_per_token: float = 0.0, meta: dict | None = None,
          extra_models: dict[str, tuple[torch.nn.Module, dict]] | None = None) -> TrainResult:
    """Train `model` (built on CPU, fp32) for settings.max_steps optimizer steps; resume if a
    checkpoint exists in stage_dir; write stage_dir/final. Returns a TrainResult.

    extra_models: {name: (module, overrides)} trained beside it (e.g. a PPO critic), each with
    its own optimizer and the primary's settings changed by `overrides` (lr, grad_clip,
    weight_decay, ...); saved in step-N/<name>/."""
    s = settings
    d = dist_info or setup_distributed()
    precision = resolve_precision(s.precision, d.device)
    stage_dir = Path(stage_dir)
    if d.main:
        ckpt.clean_partial(stage_dir)
    if d.world > 1:
        dist.barrier()
    members = [Member(PRIMARY, model, s)]
    for name, (module, overrides) in (extra_models or {}).items():
        if name == PRIMARY or "/" in name:
            raise ValueError(f"extra model name {name!r} is reserved or not a folder name")
        members.append(Member(name, module, replace(s, **overrides)))

    ts, state, latest = restore(stage, stage_dir, members, d)
    _wrap(members, state, batches, d)
    raw = model
    ema = WeightEMA(raw, s.ema_decay) if s.ema_decay else None
    if ema is not None and latest is not None and (latest / WeightEMA.FOLDER).is_dir():
        ema.load(raw, latest / WeightEMA.FOLDER)
    logger = Logger(log_dir, stage, ts.step, d.main, s.tensorboard)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    peak = peak_flops(d.device, precision) if (flops_per_token and d.main) else 0.0

    def run_eval(step: int) -> None:
        if eval_fn is None:
            return
        # with an average, it is what is evaluated and, when best, saved
        with ema.swapped_in(raw) if ema is not None else contextlib.nullcontext():
            raw.eval()
            with torch.no_grad(), autocast:
                res = eval_fn(raw)
            raw.train()
            rec = {"step": step, **{k: float(v) for k, v in res.items()}}
            ts.evals.append(rec)
            logger.write({"kind": "eval", **rec})
            if _improved(ts, rec, s, d):
                ts.best_step, ts.best_value, ts.best_loss = step, rec[s.select_metric], ts.last_loss
                save(ts, "best", members, batches, stage, stage_dir, d, meta)

    for m in members:
        m.raw.train()
    ts.t_start = time.perf_counter()
    start = ts.step
    bar = progress(total=s.max_steps, initial=start, desc=stage, unit="step")
    t_last, tok_last = time.perf_counter(), ts.tokens
    try:
        if s.eval_at_start and start == 0:
            run_eval(0)
        stop_before = getattr(batches, "stop_before", None)
        for step in range(start, s.max_steps):
            ts.stopped = stop_before(step) if stop_before is not None else None
            if ts.stopped:
                info(f"{stage}: stopped before step {step + 1}: {ts.stopped}")
                break
            loss, _, metrics, norms = _step(step, members, batches, loss_fn, autocast, d)
            _check_finite(stage, step + 1, loss, norms, stage_dir, s)
            if ema is not None:
                ema.update(raw)
            ts.last_loss, ts.step = loss, step + 1
            ts.tokens += tokens_per_step
            done = ts.step
            bar.update(1)
            if done % s.log_every == 0 or done == s.max_steps or done == start + 1:
                now = time.perf_counter()
                tps = (ts.tokens - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, ts.tokens
                rec = {"kind": "train", "step": done, "loss": loss, "lr": lr_at(step, s),
                       "grad_norm": norms[PRIMARY], **{f"grad_norm_{k}": v for k, v in norms.items() if k != PRIMARY},
                       "tokens": ts.tokens, "tokens_per_s": tps, **metrics}
                if peak:
                    rec["mfu"] = flops_per_token * tps / peak
                logger.write(rec)
                shown = {"loss": f"{loss:.3f}", "lr": f"{rec['lr']:.1e}"}
                if tokens_per_step:   # stages that count no tokens per step (RM, DPO, RL) show no rate of 0
                    shown["tok_s"] = f"{tps:,.0f}"
                bar.set_postfix(**shown)
            if s.eval_every and done % s.eval_every == 0 and done < s.max_steps:
                run_eval(done)
            if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.max_steps:
                save(ts, f"step-{done}", members, batches, stage, stage_dir, d, meta, ema)
        if not ts.stopped:
            ts.step = max(ts.step, s.max_steps)
        if not ts.evals or ts.evals[-1]["step"] != ts.step:
            run_eval(ts.step)
        save(ts, f"step-{ts.step}", members, batches, stage, stage_dir, d, meta, ema)
        save(ts, "final", members, batches, stage, stage_dir, d, meta, ema)
    finally:
        bar.close()
        logger.close()
    seconds = ts.seconds_before + time.perf_counter() - ts.t_start
    return TrainResult(step=ts.step, final=stage_dir / "final", last_loss=ts.last_loss, evals=ts.evals,
                       tokens=ts.tokens, seconds=seconds, precision=precision, resumed_from=ts.resumed_from,
                       selected_step=ts.best_step, stopped=ts.stopped, selected_loss=ts.best_loss)


def _check_finite(stage: str, step: int, loss: float, norms: dict, stage_dir: Path, s: LoopSettings) -> None:
    """Stop at the first non-finite loss or gradient norm (every rank sees the same reduced values): the
    weights after it are NaN, and a final/ written from them would be a broken model recorded as finished.
    Nothing of this step is saved; the checkpoints before it stay as they are."""
    bad = {k: v for k, v in {"loss": loss, **{f"grad norm ({n})" if n != PRIMARY else "grad norm": v
                                              for n, v in norms.items()}}.items() if not math.isfinite(v)}
    if not bad:
        return
    try:
        last = ckpt.latest_checkpoint(stage_dir, report=False)
    except UserError:
        last = None
    where = f"the last intact checkpoint is {last}" if last else "no checkpoint was saved before it"
    raise UserError(f"{stage}: training diverged at step {step}: {', '.join(f'{k} = {v}' for k, v in bad.items())} "
                    f"(lr {s.lr:g}); stopped without writing {stage_dir / 'final'} ({where}). Lower "
                    f"{stage}.lr (or raise {stage}.warmup_steps) and rerun")


def _scale_grads(model: torch.nn.Module, factor: float) -> None:
    """Turn the accumulated sum of n_i * grad(mean loss_i) (averaged over ranks by DDP) into
    the gradient of the mean loss over every target of the global batch."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, factor)


