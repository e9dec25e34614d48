"""RUN_DIR/report/timings.json: how long each stage took to build what is in the run directory, and on
which machine.

    {"stages": {"pretrain": {"seconds": 212.4, "action": "start", "finished": "...", "host": "box"}, ...},
     "total_s": 431.0,
     "machines": {"box": {"cpu": "...", "cores": 16, "memory_gib": 62.8, "gpu": "...",
                          "python": "3.11.2", "torch": "2.5.1", "zero_chatgpt": "0.1.0"}},
     "updated": "..."}

Every command that runs a stage merges its entry in (`record`), so a stage run alone is counted too and
the entries of the others stay. A stage that skipped (up to date) keeps the entry of the command that
built it: the file says what the outputs cost, not what the last command did (a stage continued with more
steps adds its new seconds to the old). Only a stage that has no entry yet (a run directory older than this
file) takes the seconds its own record (.stage.json) holds. `total_s` is the sum over the entries.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from zero_chatgpt import __version__
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.registry import STAGES
from zero_chatgpt.core.rundir import read_marker

FILE = "timings.json"


def path_of(rd) -> Path:
    return Path(rd.report) / FILE


def load(rd) -> dict:
    """The timings of run directory `rd` ({"stages": {}} when there are none or the file is unreadable)."""
    try:
        t = json.loads(path_of(rd).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"stages": {}, "machines": {}}
    if not isinstance(t, dict) or not isinstance(t.get("stages"), dict):
        return {"stages": {}, "machines": {}}
    t.setdefault("machines", {})
    return t


def record(rd, name: str, outcome: dict) -> dict:
    """Merge one stage's outcome ({"action", "seconds"}, from ctx.outcomes) into timings.json (atomically)."""

    action = outcome.get("action", "ran")
    if action == "not built":
        return load(rd)
    t = load(rd)
    stages = t["stages"]
    host = platform.node() or "this machine"
    if action == "skip":
        if name in stages:
            return t
        seconds = read_marker(Path(rd.root) / STAGES[name].out).get("seconds")
        if seconds is None:
            return t
        entry = {"seconds": round(float(seconds), 2), "action": "skip", "finished": "", "host": host}
    else:
        seconds = float(outcome.get("seconds", 0.0))
        if action == "continue" and name in stages:     # more steps on top of the finished run: both paid for it
            seconds += float(stages[name].get("seconds") or 0.0)
        entry = {"seconds": round(seconds, 2), "action": action, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "host": host}
    stages[name] = entry
    # pipeline order, whatever order the stages were run in
    t["stages"] = {k: stages[k] for k in sorted(stages, key=lambda s: list(STAGES).index(s) if s in STAGES else 99)}
    t["total_s"] = round(sum(float(e.get("seconds") or 0.0) for e in t["stages"].values()), 2)
    t["machines"][host] = machine()
    t["updated"] = entry["finished"] or time.strftime("%Y-%m-%dT%H:%M:%S")
    Path(rd.report).mkdir(parents=True, exist_ok=True)
    atomic_write_json(path_of(rd), t)
    return t


# ---------------------------------------------------------------- the machine

def versions() -> dict:
    """python, torch, zero-chatgpt (torch by its installed metadata: importing it costs seconds)."""

    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"python": platform.python_version(), "torch": torch_version, "zero_chatgpt": __version__}


def machine() -> dict:
    """CPU model, cores, memory, GPU and versions of the machine this process runs on."""
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = cores
    return {"os": f"{platform.system()} {platform.release()}", "cpu": _cpu_model(), "cores": cores,
            "usable_cores": usable, "memory_gib": _memory_gib(), "gpu": _gpu(), **versions()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        out = _quiet(["sysctl", "-n", "machdep.cpu.brand_string"])
        if out:
            return out
    return platform.processor() or platform.machine() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        out = _quiet(["sysctl", "-n", "hw.memsize"]) if sys.platform == "darwin" else ""
        return round(int(out) / 2**30, 1) if out.isdigit() else None


def _gpu() -> str:
    """The GPUs torch sees, when torch is already loaded (a training stage ran in this process); else what
    nvidia-smi lists; else "none"."""
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                return _count(names)
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return "Apple MPS"
        except Exception:          # a broken driver: the report still says what it can
            pass
    if shutil.which("nvidia-smi"):
        out = _quiet(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
        if out:
            return _count([line.strip() for line in out.splitlines() if line.strip()])
    return "none"


def _count(names: list[str]) -> str:
    if not names:
        return "none"
    uniq = sorted(set(names), key=names.index)
    return ", ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in uniq)


def _quiet(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
