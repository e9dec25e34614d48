"""Robustness of alignment: the reward model, PPO, DPO and GRPO trained again with other seeds on the same SFT model.

A gain measured with one seed may be luck. For each seed S this copies a finished run up to SFT (its data,
tokenizer, token shards, pretrained and SFT models: never retrained), runs `zero-chatgpt run --set
rl.seed=S` there (rl.seed seeds the preference data, the reward model and every RL stage; the eval prompts
and their bootstrap stay those of run.seed), and reads each method's paired difference to SFT on the held-out
eval prompts (eval/<stage>.json: vs_sft.char_f1, with its 95 % bootstrap interval and n). A method is robust
here when its interval is above 0 in at least 2 of the 3 seeds.

    .venv/bin/python bench/rl_seeds.py [--run-dir runs/demo] [--seeds 11 22 33] [--work DIR] [--quick]

--quick builds a tiny run (a few thousand real texts, a model of a few thousand parameters, a few steps per
stage) and uses 2 seeds: it checks the machinery in under a minute; its figures mean nothing.

Last stdout line: JSON with, per method, the per-seed gains (diff, ci95, n), how many seeds have the interval
above 0, and whether the target (>= 2 of 3) is met.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ppo", "dpo", "grpo")
UPSTREAM = ("config.toml", "data", "sft_data", "tokenizer", "tokens", "pretrain", "sft")


def zc(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "ZC_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "zero_chatgpt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def tiny_run(where: Path) -> tuple[Path, list[str]]:
    """A tiny finished run up to SFT (the tests' tiny pipeline) and the --set arguments of its later stages."""
    sys.path.insert(0, str(ROOT / "tests"))
    from runs import tiny_args, write_sources
    from test_rlhf_stages import RL
    corpus, chat = write_sources(where / "src")
    more = {**RL, "ppo.max_steps": 8, "ppo.eval_every": 4, "ppo.checkpoint_every": 4, "sft.rl_fraction": 0.3}
    args = [*tiny_args(**more), "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]']
    r = zc("run", "--run-dir", where / "run", "--until", "sft", *args)
    if r.returncode:
        sys.exit(f"rl_seeds: building the tiny run failed:\n{r.stderr[-3000:]}")
    return where / "run", []


def one_seed(run_dir: Path, work: Path, seed: int, extra: list[str]) -> dict:
    """Copy the run up to SFT into work/seed-S, train rm, ppo, dpo, grpo and eval there with rl.seed = S."""
    dst = work / f"seed-{seed}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in UPSTREAM:
        src = run_dir / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        elif src.exists():
            shutil.copy2(src, dst / name)
    t0 = time.time()
    r = zc("run", "--run-dir", dst, "--until", "eval", "--set", f"rl.seed={seed}", *extra)
    if r.returncode:
        sys.exit(f"rl_seeds: seed {seed} failed (in {dst}):\n{r.stderr[-3000:]}")
    out = {"seed": seed, "seconds": round(time.time() - t0, 1)}
    for m in METHODS:
        ev = json.loads((dst / "eval" / f"{m}.json").read_text())
        d = ev.get("vs_sft", {}).get("char_f1") or {}
        out[m] = {"diff": d.get("diff"), "ci95": d.get("ci95"), "n": d.get("n"),
                  "win_rate_vs_sft": ev.get("win_rate_vs_sft")}
    rm = json.loads((dst / "eval" / "rm.json").read_text())
    out["rm_accuracy"] = rm.get("accuracy")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo",
                    help="a run whose SFT stage is finished (default runs/demo)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 22, 33], help="values of rl.seed (default 11 22 33)")
    ap.add_argument("--work", type=Path, default=None, help="where the per-seed runs go (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="a tiny run and 2 seeds: the machinery in under a minute")
    a = ap.parse_args(argv)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="rl_seeds-"))
    work = a.work or tmp
    try:
        if a.quick:
            run_dir, extra = tiny_run(tmp / "tiny")
            seeds = a.seeds[:2]
        else:
            run_dir, extra, seeds = a.run_dir, [], a.seeds
            if not (run_dir / "sft" / "final").is_dir():
                sys.exit(f"rl_seeds: {run_dir} has no finished SFT model; run `make demo` first (or give --run-dir)")
        results = []
        for s in seeds:
            res = one_seed(run_dir, work, s, extra)
            results.append(res)
            print(f"seed {s}: " + ", ".join(f"{m} {res[m]['diff']:+.4f} {res[m]['ci95']}" for m in METHODS)
                  + f"  (rm accuracy {res['rm_accuracy']:.3f}, {res['seconds']:.0f} s)", flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    above = {m: sum(1 for r in results if r[m]["ci95"] and r[m]["ci95"][0] > 0) for m in METHODS}
    print(json.dumps({"run_dir": str(run_dir) if not a.quick else "tiny", "seeds": seeds,
                      "gains": {m: [{"seed": r["seed"], **r[m]} for r in results] for m in METHODS},
                      "rm_accuracy": [r["rm_accuracy"] for r in results],
                      "seeds_above_zero": above,
                      "target_met": {m: above[m] >= 2 and len(seeds) >= 3 for m in METHODS},
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
