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
tests/test_loop_resume.py kills a run with SIGKILL to check). A raised ``max_steps`` resumes
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info, progress
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.runtime import Dist, cpu_group, gather_to_all, peak_flops, resolve_precision, setup_distributed
from zero_chatgpt.core.settings import RunSection
from zero_chatgpt.core.train_settings import TrainingSection
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

PRIMARY = "model"     # the primary model's name in loss_fn's dict and in the trainer state


@dataclass
class Member:
    """One model the loop trains: its module, its settings (lr, clipping, decay), and once wrapped
    its DDP / compiled form and optimizer. The primary is saved at the checkpoint's root."""
    name: str
    raw: torch.nn.Module
    settings: LoopSettings
    wrapped: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class TrainState:
    """Everything that moves during training besides the weights, saved with every checkpoint."""
    step: int = 0
    tokens: int = 0
    seconds_before: float = 0.0      # training time of earlier segments
    evals: list = field(default_factory=list)
    last_loss: float = float("nan")
    resumed_from: int = 0
    best_step: int = -1              # the step of the best select_metric so far (-1: none yet)
    best_value: float = float("-inf")
    best_loss: float = float("nan")  # the training loss at best_step (what final/'s meta.json reports)
    stopped: str | None = None       # why the batch source ended the run before max_steps (e.g. a KL budget)
    t_start: float = field(default_factory=time.perf_counter)


def _full_state(m: Member):
    """Full (unsharded) model and optimizer state dicts on CPU."""
    if m.settings.fsdp and dist.is_initialized():
        return get_state_dict(m.raw, m.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return m.raw.state_dict(), (m.optimizer.state_dict() if m.optimizer is not None else None)


def _load_optimizer_state(m: Member, optim_state) -> None:
    if m.settings.fsdp and dist.is_initialized():
        set_optimizer_state_dict(m.raw, m.optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        return
    m.optimizer.load_state_dict(optim_state)


def _rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def plain(obj, where: str = "trainer state"):
    """`obj` with numpy arrays and scalars turned into tensors and Python numbers, so that
    torch.load(weights_only=True) reads it back; anything else that is not plain data is an error
    here, at save time, rather than an unloadable checkpoint later."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where}: {type(obj).__name__} cannot be saved in a trainer state (tensors and plain values only)")


def _restore(stage: str, stage_dir: Path, members: list[Member], d: Dist) -> tuple[TrainState, dict | None, Path | None]:
    """Weights from the newest intact checkpoint (else init_from, else as built), and its state."""
    primary = members[0]
    latest = _agreed_checkpoint(stage_dir, primary.settings.max_steps, d)
    if latest is None:
        if primary.settings.init_from:
            try:
                ckpt.load_weights(primary.raw, primary.settings.init_from)
            except RuntimeError as e:
                raise UserError(f"init_from {primary.settings.init_from}: weights do not fit the model: "
                                f"{str(e)[:300]}") from None
            info(f"{stage}: initialized from {primary.settings.init_from}")
        torch.manual_seed(primary.settings.seed + d.rank)
        return TrainState(), None, None
    for m in members:
        folder = latest if m.name == PRIMARY else latest / m.name
        if ckpt.read_model_config(folder) != m.raw.config:
            raise UserError(f"{folder}: checkpoint was trained with a different model config; "
                            f"rerun with --force to start over (this deletes {stage_dir})")
        ckpt.load_weights(m.raw, folder)
    state = ckpt.load_trainer_state(latest)
    step = int(state["step"])
    info(f"{stage}: resuming from {latest} (step {step})")
    best = list(state.get("best") or [-1, float("-inf")])
    ts = TrainState(step=step, tokens=int(state.get("tokens", 0)), seconds_before=float(state.get("seconds", 0.0)),
                    evals=list(state.get("evals", [])), resumed_from=step, best_step=int(best[0]),
                    best_value=float(best[1]), best_loss=float(best[2]) if len(best) > 2 else float("nan"))
    return ts, state, latest


def _agreed_checkpoint(stage_dir: Path, max_steps: int, d: Dist) -> Path | None:
    """The newest intact checkpoint at or below max_steps, chosen (and hash-checked) by rank 0 alone
    and told to the others: N ranks reading every checkpoint whole would multiply the I/O by N."""
    choice = [None]
    if d.main:
        try:
            latest = ckpt.latest_checkpoint(stage_dir, max_step=max_steps)
            choice = [str(latest) if latest is not None else None]
        except UserError as e:
            choice = [e]
    if d.world > 1:
        dist.broadcast_object_list(choice, src=0, group=cpu_group())
    if isinstance(choice[0], UserError):
        raise choice[0] if d.main else UserError(f"{stage_dir}: no intact checkpoint (see rank 0's message)")
    return Path(choice[0]) if choice[0] else None


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
        _load_optimizer_state(m, optim if len(members) == 1 else optim[m.name])
    ranks = state.get("ranks") or [{"rng": state["rng"], "data": state.get("data")}]
    if len(ranks) != d.world and d.main:
        info(f"resuming with {d.world} process(es) where the checkpoint had {len(ranks)}: data order is the same, "
             f"random streams are not those of an uninterrupted run")
    mine = ranks[d.rank % len(ranks)]
    _set_rng_state(mine["rng"], device)
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


def _final_sources(ts: TrainState, stage_dir: Path, selected: bool, ema: WeightEMA | None,
                   start: str = "") -> list[Path]:
    """The checkpoints that hold the weights final/ is to hold, the preferred one first: the best one
    (and the step-N of the same step, or its average; for step 0, the weights the stage started from);
    else the last step-N. A fallback whose manifest records other weights than the first's is left out,
    so it is never other weights."""
    if not selected:
        return [stage_dir / f"step-{ts.step}"]
    step = stage_dir / f"step-{ts.best_step}"
    found = [stage_dir / "best", step / WeightEMA.FOLDER if ema is not None else step]
    if ts.best_step == 0 and start:
        found.append(Path(start))
    want = ckpt.model_hash(found[0])
    return [found[0]] + [p for p in found[1:] if ckpt.model_hash(p) in (None, want)]   # None: named as absent


def _save(ts: TrainState, name: str, members: list[Member], batches, stage: str, stage_dir: Path, d: Dist,
          meta: dict | None, ema: WeightEMA | None = None) -> None:
    """Checkpoint `name`: step-N holds the models and the trainer state (and the weight average); best the
    primary model at the best select_metric; final the primary model only, a verified copy of best when a
    metric selects it, else of step-N (saved just before it with the same weights), else (with an
    average) the average. A final/ is never written from bytes that do not match their checkpoint's
    manifest: when no copy is intact, the stage stops with one line naming each."""
    is_step = name.startswith("step-")
    selected = name == "final" and ts.best_step >= 0 and (stage_dir / "best").is_dir()
    own_final = name == "final" and ema is not None and not selected
    full, per_rank = [({}, None)] * len(members), None
    if is_step or name == "best":   # every rank takes part (FSDP gathers the full state)
        full = [_full_state(m) for m in (members if is_step else members[:1])]
    if own_final:
        full = [(ema.state_dict(members[0].raw), None)]
    if is_step:
        per_rank = gather_to_all(plain({"rng": _rng_state(d.device),
                                        "data": batches.state_dict() if hasattr(batches, "state_dict") else None}), d)
    failed = [None]
    if d.main:
        primary = members[0]
        trainer_state = None
        if is_step:
            optim = full[0][1] if len(members) == 1 else {m.name: f[1] for m, f in zip(members, full)}
            trainer_state = plain({"step": ts.step, "optimizer": optim, "tokens": ts.tokens,
                                   "seconds": ts.seconds_before + time.perf_counter() - ts.t_start,
                                   "evals": ts.evals, "ranks": per_rank,
                                   "best": [ts.best_step, ts.best_value, ts.best_loss],
                                   "rng": per_rank[0]["rng"], "data": per_rank[0]["data"]})
        start = (meta or {}).get("init_from") or primary.settings.init_from
        sources = _final_sources(ts, stage_dir, selected, ema, start) if name == "final" and not own_final else None
        extra = {m.name: (f[0], m.raw.config) for m, f in zip(members[1:], full[1:])} if is_step else None
        if is_step and ema is not None:
            extra[WeightEMA.FOLDER] = (ema.state_dict(primary.raw), primary.raw.config)
        kept = selected or name == "best"
        try:
            ckpt.save_checkpoint(
                stage_dir, name, model_state=full[0][0], cfg=primary.raw.config, trainer_state=trainer_state,
                extra_models=extra,
                meta={"stage": stage, "step": ts.best_step if kept else ts.step,
                      "loss": ts.best_loss if kept else ts.last_loss, "tokens": ts.tokens,
                      "evals": [_eval_at(ts, ts.best_step)] if kept else ts.evals[-1:],
                      **({"selected_by": primary.settings.select_metric, "selected_value": ts.best_value,
                          "trained_steps": ts.step} if selected else {}),
                      **({"weights": f"exponential moving average, decay {ema.decay:g}"}
                         if ema is not None and not is_step else {}),
                      **({"stopped": ts.stopped} if ts.stopped else {}), **(meta or {})},
                keep_last=primary.settings.keep_last if is_step else 0, copy_from=sources)
        except ckpt.NoIntactSource as e:
            what = f"step {ts.best_step} (the best by {primary.settings.select_metric})" if selected else \
                f"step {ts.step}"
            failed = [UserError(
                f"{stage}: cannot write {stage_dir / 'final'}: it is to hold the weights of {what}, and no intact copy "
                f"of them is left ({e}). Nothing was written. The other checkpoints in {stage_dir} hold other "
                f"weights; `--force` trains the stage again from the start")]
    if d.world > 1:
        dist.broadcast_object_list(failed, src=0, group=cpu_group())
        dist.barrier()
    if failed[0] is not None:
        raise failed[0] if d.main else UserError(f"{stage}: final/ not written (see rank 0's message)")


def _eval_at(ts: TrainState, step: int) -> dict:
    return next((e for e in reversed(ts.evals) if e.get("step") == step), {})


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

    ts, state, latest = _restore(stage, stage_dir, members, d)
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
                _save(ts, "best", members, batches, stage, stage_dir, d, meta)

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
                _save(ts, f"step-{done}", members, batches, stage, stage_dir, d, meta, ema)
        if not ts.stopped:
            ts.step = max(ts.step, s.max_steps)
        if not ts.evals or ts.evals[-1]["step"] != ts.step:
            run_eval(ts.step)
        _save(ts, f"step-{ts.step}", members, batches, stage, stage_dir, d, meta, ema)
        _save(ts, "final", members, batches, stage, stage_dir, d, meta, ema)
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


