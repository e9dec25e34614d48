"""Helpers for tests that assemble a run directory by hand (a tokenizer saved directly, a model trained
through the loop without its stage function): record such outputs as finished stages, as their stage
functions would, so that the commands that read a run (chat, export, eval, later stages) accept them."""
from pathlib import Path

from zero_chatgpt.io import atomic_write_json
from zero_chatgpt.rundir import MARKER, closure_key, read_marker
from zero_chatgpt.stages import STAGES


def record_stage(root, name: str, reads=(), inputs: dict | None = None) -> dict:
    """Mark stage `name` of run directory `root` complete, built from `inputs` and the stages `reads`."""
    root = Path(root)
    closure = {name: dict(inputs or {"built by": "test"})}
    for up in reads:
        closure.update(read_marker(root / STAGES[up].out)["closure"])
    record = {"stage": name, "state": "complete", "key": closure_key(closure), "closure": closure,
              "reads": list(reads), "finished": "test", "summary": {}}
    out = root / STAGES[name].out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, record)
    return record
