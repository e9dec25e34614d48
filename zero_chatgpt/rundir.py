"""The run directory: where every stage reads its inputs and writes its outputs.

    RUN_DIR/config.toml  data/  sft_data/  tokenizer/  tokens/  pretrain/  sft/ rm/ ppo/ dpo/ grpo/
            eval/  report/  logs/

A stage records what it was built from in `<out>/.stage.json`: a key hashing its
config sections and the keys of the stages it read. When the key is unchanged the
stage skips itself; when anything upstream changed, the key changes and it reruns.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from zero_chatgpt.io import atomic_write_json

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


def stage_key(cfg: dict, sections: list[str], upstream: list[Path] = (), extra: dict | None = None) -> str:
    """Hash of the config sections a stage depends on, plus the keys of its upstream stages."""
    h = hashlib.sha256()
    h.update(json.dumps({s: cfg.get(s, {}) for s in sections}, sort_keys=True).encode())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for up in upstream:
        h.update(str(read_marker(up).get("key", "missing")).encode())
    return h.hexdigest()[:16]


def read_marker(out_dir: Path) -> dict:
    p = Path(out_dir) / MARKER
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def is_complete(out_dir: Path, key: str) -> bool:
    return read_marker(out_dir).get("key") == key


def mark_complete(out_dir: Path, key: str, summary: dict | None = None) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out_dir) / MARKER, {"key": key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                               "summary": summary or {}})


@dataclass
class Context:
    """What a stage function receives: the run directory, the resolved config, its CLI args."""
    run_dir: RunDir
    cfg: dict
    force: bool = False
    args: dict = field(default_factory=dict)

    def up_to_date(self, out_dir: Path, key: str, what: str) -> bool:
        from zero_chatgpt.console import info
        if not self.force and is_complete(out_dir, key):
            info(f"{what}: up to date in {out_dir} (use --force to rebuild)")
            return True
        return False
