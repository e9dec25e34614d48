"""Fault injection: `zero-chatgpt run` SIGKILLed at random points of data, tokenizer, pretrain and SFT
(several seeds), then run again to the end, gives bitwise the outputs of an uninterrupted run, leaves no
orphan process after any kill, and reuses only parts that a live command finished."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from runs import skip_unless_ci, tiny_args, write_sources, zc
from test_processes import assert_no_orphans

STAGES = ("data", "tokenizer", "pretrain", "sft")
# the line each stage prints when its work starts (after the imports a kill would otherwise land in)
STARTS = {"data": "data: reading", "tokenizer": "training a ", "pretrain": "pretrain: ", "sft": "sft: "}
MORE = {"data.shard_docs": 100, "pretrain.max_steps": 120, "pretrain.checkpoint_every": 10, "pretrain.eval_every": 40,
        "sft.max_steps": 60, "sft.checkpoint_every": 8, "sft.eval_every": 20}
SEEDS = (0, 1, 2)
RESUMED: dict = {}                                # what the reruns resumed, over all seeds


def outputs(run) -> dict:
    """Every result file of the four stages (bytes), and the logged losses; not timings or pids."""
    out = {}
    for pattern in ("data/*.jsonl.zst", "tokenizer/tokenizer.json", "tokens/*.bin", "sft_data/*.jsonl",
                    "pretrain/final/model.safetensors", "sft/final/model.safetensors"):
        for p in sorted(run.glob(pattern)):
            out[str(p.relative_to(run))] = p.read_bytes()
    stats = json.loads((run / "data" / "stats.json").read_text())
    for k in ("seconds", "resumed_parts", "part_commands"):
        stats.pop(k)
    out["data/stats.json"] = stats
    for stage in ("pretrain", "sft"):
        recs = [json.loads(x) for x in (run / "logs" / f"{stage}.jsonl").read_text().splitlines()]
        out[f"logs/{stage}"] = [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in recs]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    corpus, chat = write_sources(root / "src")
    args = [*tiny_args(**MORE), "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]']
    r = zc("run", "--run-dir", root / "ref", "--until", "sft", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    seconds = {s: json.loads((root / "ref" / ("tokenizer" if s == "tokenizer" else s) / ".stage.json").read_text())
               ["seconds"] for s in STAGES}
    return root, args, outputs(root / "ref"), seconds


class Watched:
    """A `run` in a subprocess whose stderr is read as it comes (to see which stage it is in)."""

    def __init__(self, run_dir, args, tag):
        env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "ZC_TEST_TAG": tag}
        self.p = subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "run", "--run-dir", str(run_dir),
                                   "--until", "sft", *args], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  text=True)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.p.stderr), daemon=True).start()

    def wait_for(self, cond, timeout=120.0) -> bool:
        t0 = time.time()
        while not cond():
            if self.p.poll() is not None or time.time() - t0 > timeout:
                return False
            time.sleep(0.005)
        return True

    def wait_for_stage(self, stage) -> bool:
        started = lambda line: line.startswith(STARTS[stage]) and "up to date" not in line  # noqa: E731
        return self.wait_for(lambda: any(started(line) for line in self.lines))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_outputs(setup, tmp_path, seed):
    root, args, want, seconds = setup
    rng = random.Random(seed)
    run = tmp_path / "run"
    killed = {}                                   # pid -> time of the kill
    said: list[str] = []
    for i, stage in enumerate(STAGES):
        tag = uuid.uuid4().hex
        w = Watched(run, args if i == 0 else [], tag)
        if w.wait_for_stage(stage):
            # seed 0 kills the data stage anywhere; the others once a part is finished, so that some rerun
            # has parts to resume even when a loaded machine starts the workers slowly
            late = stage == "data" and seed
            if late:
                w.wait_for(lambda: any((run / "data" / "work").glob("part-*.json")))
            time.sleep(rng.uniform(0.0, seconds[stage] / (3 if late else 1)))
        if w.p.poll() is None:
            w.p.send_signal(signal.SIGKILL)       # the command alone: its workers must go by themselves
            killed[w.p.pid] = time.time()
        w.p.wait()
        assert_no_orphans(tag)
        said += w.lines
    r = zc("run", "--run-dir", run, "--until", "sft")
    assert r.returncode == 0, r.stderr[-3000:]
    said += r.stderr.splitlines()
    for what in ("data: resumed", "pretrain: resuming from", "sft: resuming from"):
        RESUMED[what] = RESUMED.get(what, 0) + any(line.startswith(what) for line in said)
    got = outputs(run)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k] == want[k], f"{k} differs from the uninterrupted run (seed {seed})"
    # parts reused from a killed run were finished while that command still ran: by the kill, give or take
    # the kernel's delivery of SIGKILL and of the workers' PDEATHSIG (milliseconds, more on a loaded
    # machine); an orphaned worker that went on working would write its parts seconds later
    for part in json.loads((run / "data" / "stats.json").read_text())["resumed_parts"]:
        assert part["command_pid"] in killed and part["written"] <= killed[part["command_pid"]] + 0.5, part


@pytest.mark.slow
def test_the_kills_landed_inside_the_work():
    """Over the seeds, reruns resumed cleaning parts, pretraining and SFT from their checkpoints (a kill
    that only ever hit imports or finished stages would test nothing)."""
    if len(RESUMED) < 3:
        skip_unless_ci("runs after the three fault-injection runs (select the whole file)")
    assert all(RESUMED[k] >= 1 for k in RESUMED), RESUMED
