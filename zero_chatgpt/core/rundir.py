"""The run directory, and the one helper every stage calls to decide skip / resume / refuse.

    RUN_DIR/config.toml  data/  sft_data/  tokenizer/  tokens/  pretrain/  sft/ rm/ ppo/ dpo/ grpo/
            eval/  report/  logs/  .lock

What a stage was built from is its *closure*: for itself and every stage upstream of it,
the config values that change the result (`config.result_items`: not logging, intervals,
workers, threads or the device) plus content fingerprints of its external inputs (source
files, an init_from folder; never their paths or mtimes). The upstream parts come from the
upstream stages' own records, i.e. from what is really on disk, not from today's config.
Its key is a hash of the closure. `<out>/.stage.json` records the key, the closure and the
state (running | complete).

`begin(ctx, name)` compares the closure with the record and decides:
  skip      complete with the same key (for a model stage: final/ intact, hashes checked);
  start     nothing there yet (or an earlier attempt that trained nothing);
  resume    interrupted with the same key (or final/ damaged): the training loop resumes from
            its newest intact checkpoint, a derived stage from its finished parts;
  continue  a training stage with the same inputs except a raised max_steps: it resumes from its
            last checkpoint and keeps its first run's learning-rate schedule (the added steps
            train at the schedule's floor), recorded as `<stage>.schedule_steps`;
  rebuild   a derived stage (data, tokenizer, eval) whose inputs changed: rebuilt, saying why;
  refuse    a UserError naming the changed keys (old → new) and the choices, for a training stage
            whose inputs changed, and for a derived stage that a trained stage was built from
            (rebuilding it would replace what those models were trained on, e.g. the tokenizer
            they need). Trained work is deleted, and a depended-on stage rebuilt, only with --force.

A stage is *current* when it is complete, final/ holds the weights its record names, and every
stage it read is current and still the one it read (same closure, same output). `pick_model`
gives chat/export/serve the last current model stage in pipeline order and says why the later
ones were passed over. A record written by a version before these records (a key without a closure)
does not say what its output was built from: it is never replaced silently (see `_refuse_legacy`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zero_chatgpt.core import config as config_mod
from zero_chatgpt.core import manifest
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.registry import STAGES, Stage, model_stages
from zero_chatgpt.core.settings import Config

MARKER = ".stage.json"


@dataclass
class RunDir:
    root: Path

    def __post_init__(self):
        self.root = Path(self.root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    def stage_dir(self, name: str, create: bool = True) -> Path:
        p = self.root / name
        if create:
            p.mkdir(parents=True, exist_ok=True)
        return p

    # Named locations, so no stage spells a path another stage reads differently.
    @property
    def data(self) -> Path: return self.root / "data"
    @property
    def sft_data(self) -> Path: return self.root / "sft_data"
    @property
    def tokenizer(self) -> Path: return self.root / "tokenizer"
    @property
    def tokens(self) -> Path: return self.root / "tokens"
    @property
    def eval(self) -> Path: return self.root / "eval"
    @property
    def report(self) -> Path: return self.root / "report"
    @property
    def logs(self) -> Path: return self.root / "logs"


@dataclass
class Context:
    """What a stage function receives: the run directory, the resolved config, its CLI args."""
    run_dir: RunDir
    cfg: Config
    force: bool = False
    args: dict = field(default_factory=dict)
    outcomes: dict = field(default_factory=dict)      # stage -> what begin() decided (for `run`'s summary)
    read_only: bool = False                           # chat / export / serve: never write the run directory
    _config_saved: bool = False

    def save_config(self) -> None:
        """Write config.toml once work starts: a command that fails validation, or is refused before any
        stage starts work, saves nothing (under `run`, stages that did start before a refusal saved it)."""
        if self.read_only or self._config_saved or not _is_rank0():
            return
        config_mod.save(self.run_dir.root, self.cfg)
        self._config_saved = True


def _is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- records

def read_marker(out_dir: Path) -> dict:
    try:
        m = json.loads((Path(out_dir) / MARKER).read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def finished_record(out_dir: Path, stage: Stage | None = None) -> dict:
    """The record of the finished output on disk now, or {}: a complete marker; while a training
    stage continues with more steps, the finished run's record kept in its marker. For a model
    stage, only while final/ holds the weights that record names (a continue that replaced
    final/ but was killed before recording it leaves no finished record)."""
    m = read_marker(out_dir)
    if m.get("state") == "running" and isinstance(m.get("previous"), dict):
        m = m["previous"]
    if m.get("state") != "complete" or "closure" not in m:
        return {}
    if stage is not None and stage.model and m.get("output") != final_digest(out_dir):
        return {}
    return m


def final_digest(out_dir: Path) -> str | None:
    """The weights hash final/'s manifest records (None without one)."""
    m = manifest.read(Path(out_dir) / "final") or {}
    return m.get("files", {}).get("model.safetensors", {}).get("xxh3_128")


def _write_marker(out_dir: Path, record: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / MARKER, record)


def closure_key(closure: dict) -> str:
    return hashlib.sha256(json.dumps(closure, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sub_key(parts: dict) -> str:
    """A key for an inner step of a stage (sft_data/), from plain values."""
    return closure_key(parts)


def write_sub_marker(out_dir: Path, key: str, summary: dict | None = None) -> None:
    """Record that an inner step's output in out_dir is complete for `key` (read back with read_marker)."""
    _write_marker(out_dir, {"key": key, "state": "complete", "finished": _now(), "summary": summary or {}})


# ---------------------------------------------------------------- content fingerprints


def inputs_or_recorded(ctx: "Context", name: str, keys: list[str], compute) -> dict:
    """`compute()`: the content fingerprints of a stage's external inputs ({key: value} for `keys`).
    Where an input is gone (a corpus deleted to free the disk) but the stage finished from it, the
    values its record holds: the stage is then up to date and keeps its output, instead of every
    later command stopping on the missing file."""
    try:
        return compute()
    except UserError as e:
        st = STAGES[name]
        rec = finished_record(ctx.run_dir / st.out, st)
        if not rec or any(k not in rec["closure"][name] for k in keys):
            raise
        info(f"{name}: {e}; keeping what was built from it")
        return {k: rec["closure"][name][k] for k in keys}


# ---------------------------------------------------------------- the decision

@dataclass
class StageRun:
    """What `begin` decided for a stage; `complete()` records its success."""
    ctx: Context
    stage: Stage
    out: Path
    key: str
    closure: dict
    reads: tuple[str, ...]
    action: str
    note: str = ""
    schedule_steps: int = 0       # a continued training stage keeps its first run's schedule (loop.lr_at)
    t0: float = field(default_factory=time.time)

    @property
    def skip(self) -> bool:
        return self.action == "skip"

    def complete(self, summary: dict | None = None) -> None:
        seconds = round(time.time() - self.t0, 2)
        if _is_rank0():
            prev = read_marker(self.out)
            _write_marker(self.out, {"stage": self.stage.name, "state": "complete", "key": self.key,
                                     "closure": self.closure, "reads": list(self.reads),
                                     "output": output_id(self.stage, self.out, self.key),
                                     "schedule_steps": self.schedule_steps,
                                     "started": prev.get("started"), "finished": _now(),
                                     "seconds": seconds, "summary": summary or {}})
        self.ctx.outcomes[self.stage.name] = {"action": self.action, "seconds": seconds}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def output_id(stage: Stage, out: Path, key: str) -> str:
    """What a stage's output is, for the stages that read it: a model stage's weights hash (a retrain
    that gives other weights is another output, an identical one is not), else its key (the derived
    stages are deterministic functions of their inputs)."""
    return (final_digest(out) if stage.model else None) or key


def _output_of(m: dict) -> str:
    return m.get("output") or m.get("key", "")


def closure_for(ctx: Context, name: str, sections, extra: dict | None, reads) -> dict:
    """The closure of stage `name`: its own result values and its upstream stages' records."""
    own = {**config_mod.result_items(ctx.cfg, sections), **(extra or {})}
    closure: dict = {name: own}      # own["@up"]: the output of each upstream stage it reads
    rd = ctx.run_dir
    for up in reads:
        ust = STAGES[up]
        m = finished_record(rd / ust.out, ust)
        why = stale_reason(rd, up)
        if not m:
            raise UserError(f"{name} reads the output of {up}, which is not built in {rd.root / ust.out} ({why}): "
                            f"run `zero-chatgpt {up} --run-dir {rd.root}` first")
        if why:
            raise UserError(f"{name} reads {up}, which is out of date ({why}): rebuild it first "
                            f"(`zero-chatgpt run --run-dir {rd.root} --until {up}`)")
        own[f"@{up}"] = _output_of(m)
        for s, vals in m["closure"].items():
            if s in closure and closure[s] != vals:
                raise UserError(f"{name}: its inputs {', '.join(reads)} were built from different versions of "
                                f"{s}; rebuild them (`zero-chatgpt run --run-dir {rd.root}`)")
            closure[s] = vals
    return closure


def describe_changes(old: dict, new: dict, limit: int = 6) -> str:
    """'pretrain.lr 0.0025 → 0.001, data.min_chars 30 → 40' from two closures."""
    changes: dict[str, tuple] = {}
    for stage in list(new) + [s for s in old if s not in new]:
        o, n = old.get(stage, {}), new.get(stage, {})
        for k in list(n) + [k for k in o if k not in n]:
            if o.get(k, "∅") != n.get(k, "∅"):
                changes.setdefault(k, (o.get(k, "(none)"), n.get(k, "(none)")))
    parts = [f"{k} {_short(a)} → {_short(b)}" for k, (a, b) in changes.items()]
    more = f" and {len(parts) - limit} more" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more if parts else "(no key changed)"


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def _only_steps_raised(stage: Stage, old: dict, new: dict) -> bool:
    o, n = dict(old.get(stage.name, {})), dict(new.get(stage.name, {}))
    k = stage.steps_key
    if k not in o or k not in n or n[k] <= o[k]:
        return False
    o.pop(k), n.pop(k)
    o.pop(f"{stage.name}.schedule_steps", None), n.pop(f"{stage.name}.schedule_steps", None)
    return {**old, stage.name: o} == {**new, stage.name: n}


def dependents(rd: RunDir, name: str) -> list[str]:
    """Trained stages whose finished output was built from stage `name`'s current output (or that an
    earlier version recorded, which cannot tell)."""
    out = []
    for st in STAGES.values():
        if not st.trained or st.name == name:
            continue
        m = read_marker(rd / st.out)
        rec = finished_record(rd / st.out, st)
        if (rec and name in rec["closure"]) or ("key" in m and "closure" not in m and (rd / st.out / "final").is_dir()):
            out.append(st.name)
    return out


@dataclass
class Decision:
    """What a stage does now and why, as `decide` found it; `begin` acts on it."""
    action: str                  # start | skip | resume | continue | rebuild
    note: str                    # why (the changed inputs, --force)
    key: str
    closure: dict
    reads: tuple[str, ...]
    schedule_steps: int
    marker: dict                 # the stage folder's record as read
    finished: dict               # the finished run's record, if its output is on disk
    running: dict                # the record of a run that did not finish, if any
    says: list[str] = field(default_factory=list)    # what to tell the user before acting


def decide(ctx: Context, name: str, *, extra: dict | None = None, reads: tuple[str, ...] | None = None) -> Decision:
    """What stage `name` does now (see the module docstring), from the run directory as it is: reads, never
    writes, deletes or waits; refuses with a UserError."""
    st = STAGES[name]
    says: list[str] = []
    rd = ctx.run_dir
    reads = tuple(st.reads if reads is None else reads)
    closure = closure_for(ctx, name, st.sections, extra, reads)
    out = rd / st.out
    m = read_marker(out)
    if "key" in m and "closure" not in m:        # written by an earlier version: its inputs are unknown
        if not ctx.force:
            _refuse_legacy(rd, st, out)
        m = {}
    rec = finished_record(out, st)               # the finished output on disk, if any
    running = m if m.get("state") == "running" else {}
    # the record of a finished run whose final/ was deleted since: its checkpoints are still its work
    lost_final = m if not rec and st.model and m.get("state") == "complete" and "closure" in m \
        and not (out / "final").exists() else {}
    # a continued run keeps the schedule of its first run: inherit that from the records
    sched = int((running or rec).get("schedule_steps") or 0)
    if sched and closure[name].get(st.steps_key, 0) > sched:
        closure[name][f"{name}.schedule_steps"] = sched
    key = closure_key(closure)
    work = _has_work(out)
    action, note = "start", ""
    if ctx.force:
        action, note = ("rebuild", "--force") if m or work else ("start", "")
    elif rec and rec.get("key") == key:
        why = manifest.problem(out / "final") if st.model else None      # hashes: a flipped bit too
        action = "skip" if why is None else "resume"
        if why:
            says.append(f"{name}: {out / 'final'} is damaged ({why}); rebuilding it from the last checkpoint")
    elif running.get("key") == key:
        action = "resume"
    elif lost_final.get("key") == key:
        action = "resume"
        last = _newest_step(out)
        says.append(f"{name}: {out / 'final'} is missing; " + (f"rebuilding it from {last.name} (no training when that is "
             f"the last step)" if last else "no checkpoint is left either: training the stage again"))
    elif st.trained and work:
        old = (running or rec or lost_final or {}).get("closure")
        more_steps = old is not None and _only_steps_raised(st, old, closure)
        if more_steps and not _has_checkpoint(out):
            raise UserError(f"{name}: raising {st.steps_key} continues from the last checkpoint, but {out} has no "
                            f"intact step-N checkpoint left; add --force to train it again from the start, or undo "
                            f"the change")
        if more_steps:
            action, note = "continue", describe_changes(old, closure)
            if not sched:
                sched = int(old[name][st.steps_key])
                closure[name][f"{name}.schedule_steps"] = sched
                key = closure_key(closure)
        else:
            changed = describe_changes(old, closure) if old is not None else \
                "the checkpoints there have no record of what they were trained from"
            raise UserError(
                f"{name} in {out} was trained from other inputs: {changed}. To retrain it (this deletes "
                f"{out}), add --force; to keep it, undo the change. Raising {st.steps_key} continues a finished "
                f"stage from its last checkpoint")
    elif not st.trained and (rec or running) and dependents(rd, name):
        deps = dependents(rd, name)
        raise UserError(
            f"{name}: its inputs changed ({describe_changes((rec or running)['closure'], closure)}), but "
            f"{', '.join(deps)} {'was' if len(deps) == 1 else 'were'} trained on its current output in {out}, which "
            f"rebuilding would replace. Undo the change, use a new --run-dir for the new inputs, or add --force to "
            f"rebuild it anyway ({', '.join(deps)} then wait for a retrain with --force)")
    elif (rec or running).get("closure") is not None:
        action, note = ("rebuild", describe_changes((rec or running)["closure"], closure)) if not st.trained \
            else ("start", "")
    return Decision(action, note, key, closure, reads, sched, m, rec, running, says)


def begin(ctx: Context, name: str, *, extra: dict | None = None, reads: tuple[str, ...] | None = None) -> StageRun:
    """Decide what stage `name` does now (`decide`) and act on it: print why, delete what --force replaces,
    record the run as running. Prints one line when it skips, refuses with a UserError. Call it first in
    every stage function, on every rank."""
    d = decide(ctx, name, extra=extra, reads=reads)
    for line in d.says:
        info(line)
    st, out = STAGES[name], ctx.run_dir / STAGES[name].out
    action, note, key, closure, reads, sched = d.action, d.note, d.key, d.closure, d.reads, d.schedule_steps
    m, rec, running = d.marker, d.finished, d.running
    run = StageRun(ctx, st, out, key, closure, reads, action, note, schedule_steps=sched)
    ctx.outcomes[name] = {"action": action, "seconds": 0.0}
    if action == "skip":
        if m.get("state") == "running" and _is_rank0():
            _write_marker(out, rec)            # back to the finished run after an interrupted continue
        info(f"{name}: up to date in {out} (use --force to rebuild)")
        return run
    ctx.save_config()
    if action == "rebuild" and st.trained and _is_rank0():
        info(f"{name}: --force: deleting {out} and training again")
        _remove_trained(out)
    elif action == "rebuild":
        info(f"{name}: rebuilding ({note})")
    elif action == "continue":
        info(f"{name}: continuing from its last checkpoint ({note}); the added steps keep the first run's "
             f"learning-rate schedule, at its final rate")
    _barrier(st)
    if _is_rank0():
        record = {"stage": name, "state": "running", "key": key, "closure": closure, "reads": list(reads),
                  "schedule_steps": sched, "started": _now()}
        if action in ("continue", "resume") and (running.get("previous") or (rec if action == "continue" else None)):
            # final/ stays the finished run's until the continued one replaces it: keep its record,
            # so readers still see it and a return to the old inputs finds it complete
            record["previous"] = running.get("previous") or rec
        _write_marker(out, record)
    _barrier(st)
    return run


def _refuse_legacy(rd: RunDir, st: Stage, out: Path) -> None:
    """An earlier version's output, whose record does not say what it was built from: never replaced silently
    where it is trained work or trained work was built from it."""
    deps = dependents(rd, st.name)
    if not st.trained and not deps:
        return                                     # nothing was built from it: rebuilt as usual
    raise UserError(f"{st.name} in {out} was built by an earlier version of zero-chatgpt, whose record does not say "
                    f"from which inputs{' (and ' + ', '.join(deps) + ' was built from it)' if deps else ''}; it is "
                    f"kept as it is. Use a new --run-dir, or add --force to rebuild it (replacing it)")


def _newest_step(out: Path) -> Path | None:
    from zero_chatgpt.core.checkpoint import list_checkpoints  # lazy: it imports torch; the CLI starts without it
    steps = [p for p in list_checkpoints(out) if (p / manifest.MANIFEST).exists()]
    return steps[-1] if steps else None


def _has_checkpoint(out: Path) -> bool:
    return any(p.name.startswith("step-") and (p / manifest.MANIFEST).exists() for p in out.iterdir())


def _has_work(out: Path) -> bool:
    return out.is_dir() and any(p.name.startswith("step-") or p.name == "final" for p in out.iterdir())


def _remove_trained(out: Path) -> None:
    for p in list(out.iterdir()) if out.is_dir() else []:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != MARKER:
            p.unlink()


def _barrier(st: Stage) -> None:
    """Under torchrun, the ranks of a distributed stage meet (rank 0 decided and wrote); a stage that is
    not distributed runs on rank 0 alone (cli.run_stage), so there is nobody to meet."""
    if st.distributed and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "torch" in sys.modules:
        import torch.distributed as dist  # lazy: ~3 s to import; the CLI imports this module and starts without it
        if dist.is_initialized():
            dist.barrier()


# ---------------------------------------------------------------- what is current

def stale_reason(rd: RunDir, name: str) -> str | None:
    """None if stage `name` is complete and current, else why not (for a message)."""
    st = STAGES[name]
    m = read_marker(rd / st.out)
    if not m:
        return "not built"
    if "key" in m and "closure" not in m:
        return ("recorded by an earlier version of zero-chatgpt, whose record does not say from which inputs; "
                "use a new --run-dir, or --force to rebuild it")
    rec = finished_record(rd / st.out, st)
    if not rec:
        if not st.model or m.get("state") == "running":
            return "not finished"
        if not (rd / st.out / "final").exists():
            return f"its final/ is missing (`zero-chatgpt {name} --run-dir {rd.root}` rebuilds it from its checkpoints)"
        return "its final/ is not the recorded one"
    if st.model:
        why = manifest.problem(rd / st.out / "final", hashes=False)
        if why:
            return f"its final checkpoint is damaged: {why}"
    for up in rec.get("reads", []):
        ust = STAGES[up]
        um = finished_record(rd / ust.out, ust)
        if not um:
            return f"{up} is missing or not finished: {stale_reason(rd, up)}"
        if rec["closure"].get(name, {}).get(f"@{up}") != _output_of(um) or \
                any(rec["closure"].get(s) != v for s, v in um.get("closure", {}).items()):
            return f"{up} was rebuilt after it" + (f" ({um['finished']})" if um.get("finished") else "")
        why = stale_reason(rd, up)
        if why:
            return f"{up} is out of date: {why}"
    return None


def pick_model(rd: RunDir, stage: str | None, chat: bool) -> tuple[str, Path, list[str]]:
    """(stage, its final/ folder, notes) for chat/export/serve.

    With a stage name: that stage's final model (an unknown name or a missing model is a UserError).
    Without: the last stage in pipeline order whose model is complete and current; the notes say
    which later stages were passed over and why. chat=True considers only chat models
    (SFT and after), falling back to none."""
    candidates = model_stages(chat_only=chat)
    valid = [s.name for s in model_stages()]
    if stage:
        if stage not in valid:
            raise UserError(f"--stage {stage}: not a stage with a model; choose one of {', '.join(valid)}")
        path = rd / STAGES[stage].out / "final"
        why = manifest.problem(path, hashes=False) if path.is_dir() else "not trained"
        if why:
            raise UserError(f"no usable {stage} model in {path} ({why}): run `zero-chatgpt {stage} --run-dir "
                            f"{rd.root}` first")
        notes = []
        stale = stale_reason(rd, stage)
        if stale:
            notes.append(f"note: {stage} is not current ({stale})")
        return stage, path, notes
    notes = []
    for st in reversed(candidates):
        path = rd / st.out / "final"
        if not path.is_dir() and not (rd / st.out).is_dir():
            continue
        why = stale_reason(rd, st.name)
        if why is None:
            return st.name, path, notes
        notes.append(f"{st.name} passed over: {why}")
    if chat and (rd / "pretrain" / "final").is_dir():
        raise UserError(f"no current chat model in {rd.root}" + (f" ({'; '.join(notes)})" if notes else "") +
                        f": run `zero-chatgpt sft --run-dir {rd.root}` (or talk to the pretrained model with "
                        f"--stage pretrain)")
    raise UserError(f"no trained model in {rd.root}" + (f" ({'; '.join(notes)})" if notes else "") +
                    f": run `zero-chatgpt run --run-dir {rd.root}` (or the stages up to `zero-chatgpt sft`)")


# ---------------------------------------------------------------- one writer at a time

