"""What a training run keeps across a stop: the models it trains (Member), the state that moves besides the
weights (TrainState), and the checkpoints it writes (step-N, best, final) and resumes from, with every rank's
random state and data position."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_optimizer_state_dict,
)

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.runtime import Dist, cpu_group, gather_to_all
from zero_chatgpt.core.train_settings import TrainingSection
from zero_chatgpt.train.optim import WeightEMA

PRIMARY = "model"     # the primary model's name in loss_fn's dict and in the trainer state


@dataclass
class Member:
    """One model the loop trains: its module, its settings (lr, clipping, decay), and once wrapped
    its DDP / compiled form and optimizer. The primary is saved at the checkpoint's root."""
    name: str
    raw: torch.nn.Module
    settings: TrainingSection      # a LoopSettings (train/loop.py)
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


def full_state(m: Member):
    """Full (unsharded) model and optimizer state dicts on CPU."""
    if m.settings.fsdp and dist.is_initialized():
        return get_state_dict(m.raw, m.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return m.raw.state_dict(), (m.optimizer.state_dict() if m.optimizer is not None else None)


def load_optimizer_state(m: Member, optim_state) -> None:
    if m.settings.fsdp and dist.is_initialized():
        set_optimizer_state_dict(m.raw, m.optimizer, optim_state, options=StateDictOptions(full_state_dict=True))
        return
    m.optimizer.load_state_dict(optim_state)


def rng_state(device: torch.device) -> dict:
    st = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
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


def restore(stage: str, stage_dir: Path, members: list[Member], d: Dist) -> tuple[TrainState, dict | None, Path | None]:
    """Weights from the newest intact checkpoint (else init_from, else as built), and its state."""
    primary = members[0]
    latest = agreed_checkpoint(stage_dir, primary.settings.max_steps, d)
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


def agreed_checkpoint(stage_dir: Path, max_steps: int, d: Dist) -> Path | None:
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


def final_sources(ts: TrainState, stage_dir: Path, selected: bool, ema: WeightEMA | None,
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


def save(ts: TrainState, name: str, members: list[Member], batches, stage: str, stage_dir: Path, d: Dist,
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
        full = [full_state(m) for m in (members if is_step else members[:1])]
    if own_final:
        full = [(ema.state_dict(members[0].raw), None)]
    if is_step:
        per_rank = gather_to_all(plain({"rng": rng_state(d.device),
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
        sources = final_sources(ts, stage_dir, selected, ema, start) if name == "final" and not own_final else None
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
                      "evals": [eval_at(ts, ts.best_step)] if kept else ts.evals[-1:],
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


def eval_at(ts: TrainState, step: int) -> dict:
    return next((e for e in reversed(ts.evals) if e.get("step") == step), {})
