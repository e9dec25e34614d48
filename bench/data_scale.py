"""The data stage as work grows: documents/s, peak memory and index bytes per document, by executor.

    .venv/bin/python bench/data_scale.py [--quick] [--sizes 100000,300000,1000000] [--executors local,ray]

The corpus: synthetic documents built from the built-in text (People's Daily 1998-01 and the
idiom paragraphs), each 3-6 sentences drawn at random (so documents are distinct: two random
documents share almost no character 5-grams), then planted duplicates: 10 % exact copies of
earlier documents and 10 % near copies (2 % of their characters substituted, Jaccard ~0.85, above
the 0.7 threshold). Written as one plain-text file, one document per line (`--source text:FILE`).

Each size and executor runs `zero-chatgpt data` on a fresh run directory in its own process:
- `stage_s`: the stage's own seconds (report/timings.json; interpreter start excluded);
- `docs_per_s`: documents read / stage_s;
- `peak_mem_mb`: the largest sum of RSS over the stage's process tree (the driver, its cleaning
  processes, and for Ray the raylet, GCS and workers it starts), sampled every 50 ms with psutil;
- `bytes_per_doc`: what the dedup index holds per document (stats.json: LSH band keys + exact hash);
- and a check that the planted duplicates were found (exact and near drops).

`scaling_exponent` is the slope of log(stage_s) over log(documents) for the local executor
(least squares over the sizes): ~1 means near-linear, 2 would be a quadratic step.
Ray is started by the stage itself (`ray.init`, a local cluster of this machine's cores), so its
start-up cost is inside its time. The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zero_chatgpt.data.builtin import iter_idiom_documents, iter_peoples_daily  # noqa: E402

EXACT_SHARE, NEAR_SHARE, EDIT_RATE = 0.10, 0.10, 0.02


def sentences() -> list[str]:
    out: list[str] = []
    for doc in list(iter_peoples_daily()) + list(iter_idiom_documents()):
        for s in re.split(r"(?<=[。！？])", doc["text"].replace("\n", "")):
            s = s.strip()
            if 12 <= len(s) <= 120:
                out.append(s)
    return out


def build_corpus(path: Path, n: int, pool: list[str], seed: int = 0) -> dict:
    """n documents: distinct ones, then exact and near copies of earlier ones, shuffled in."""
    rng = random.Random(seed)
    n_exact, n_near = int(n * EXACT_SHARE), int(n * NEAR_SHARE)
    n_base = n - n_exact - n_near
    chars = "".join(pool[:2000])
    docs = ["".join(rng.choices(pool, k=rng.randint(3, 6))) for _ in range(n_base)]

    def near(s: str) -> str:
        c = list(s)
        for _ in range(max(1, round(len(c) * EDIT_RATE))):
            c[rng.randrange(len(c))] = chars[rng.randrange(len(chars))]
        return "".join(c)

    copies = [docs[rng.randrange(n_base)] for _ in range(n_exact)] + \
             [near(docs[rng.randrange(n_base)]) for _ in range(n_near)]
    # every copy comes after its original (the stage keeps the first occurrence)
    out = docs + copies
    with open(path, "w", encoding="utf-8") as fh:
        for d in out:
            fh.write(d + "\n")
    return {"docs": n, "planted_exact": n_exact, "planted_near": n_near, "bytes": path.stat().st_size}


def run_measured(cmd: list[str], *, env: dict | None = None, cwd: Path | None = None, kill_when=None,
                 timeout: float = 3600) -> dict:
    """Run `cmd`: its wall seconds, the peak of the summed RSS of its whole process tree (sampled every 50 ms
    with psutil), exit code, whether it was killed, and its output's tail. kill_when(): checked while it runs;
    when true, the tree gets SIGKILL (a kill -9 mid-run). Progress bars are off."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                            env={**os.environ, "ZC_NO_PROGRESS": "1", **(env or {})}, start_new_session=True)
    root, peak, killed = psutil.Process(proc.pid), 0, False
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            tree = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        if not killed and ((kill_when is not None and kill_when()) or time.perf_counter() - t0 > timeout):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    reader.join(timeout=5)
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_mem_mb": round(peak / 2 ** 20, 1),
            "rc": proc.returncode, "killed": killed, "tail": "".join(out)[-3000:]}


def run_stage(corpus: Path, run_dir: Path, executor: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "zero_chatgpt", "data", "--run-dir", str(run_dir), "--source", f"text:{corpus}",
           "--set", f"data.workers={workers}", "--set", "data.shard_docs=10000"]
    if executor != "local":  # local is the default (and the only executor of older versions)
        cmd += ["--set", f"data.executor={executor}"]
    r = run_measured(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"data stage ({executor}) failed with exit code {r['rc']}:\n{r['tail']}")
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    timings = json.loads((run_dir / "report" / "timings.json").read_text())
    stage_s = float(timings["stages"]["data"]["seconds"])
    dd = stats.get("dedup", {})
    return {"stage_s": round(stage_s, 2), "wall_s": r["seconds"], "peak_mem_mb": r["peak_mem_mb"],
            "docs_in": stats["docs_in"], "docs_out": stats["docs_out"],
            "exact_dup": stats["dropped"].get("exact_dup", 0), "near_dup": stats["dropped"].get("near_dup", 0),
            "bytes_per_doc": round(float(dd.get("index_bytes_per_doc", 0.0)), 1)}


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="sizes 20k and 60k (about a minute with both executors)")
    ap.add_argument("--sizes", default="", help="comma-separated document counts (default 100000,300000,1000000)")
    ap.add_argument("--executors", default="local,ray", help="comma-separated: local, ray (ray needs the [ray] extra)")
    ap.add_argument("--workers", type=int, default=0, help="cleaning processes / Ray CPUs (0 = all cores)")
    ap.add_argument("--keep", default="", help="keep the corpora and run directories under this folder")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
        ([20_000, 60_000] if args.quick else [100_000, 300_000, 1_000_000])
    executors = [e for e in args.executors.split(",") if e]
    if "ray" in executors:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("ray is not installed (pip install 'zero-chatgpt[ray]'): measuring the local executor only",
                  file=sys.stderr)
            executors.remove("ray")
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="zc-data-scale-"))
    base.mkdir(parents=True, exist_ok=True)
    pool = sentences()
    results: dict[str, dict[str, dict]] = {e: {} for e in executors}
    try:
        for n in sizes:
            corpus = base / f"corpus-{n}.txt"
            made = build_corpus(corpus, n, pool)
            for e in executors:
                rd = base / f"run-{e}-{n}"
                shutil.rmtree(rd, ignore_errors=True)
                r = run_stage(corpus, rd, e, args.workers)
                r["docs_per_s"] = round(r["docs_in"] / r["stage_s"], 1)
                # the planted copies must be found (a little more is fine: the generator's own collisions)
                r["found_exact"] = r["exact_dup"] >= made["planted_exact"] * 0.99
                # near copies at Jaccard ~0.8 meet 15 bands x 8 rows with probability ~0.95 (the LSH S-curve)
                r["near_recall"] = round(r["near_dup"] / made["planted_near"], 4)
                r["found_near"] = r["near_recall"] >= 0.9
                results[e][str(n)] = r
                print(f"{e:>5} {n:>9,} docs  {r['stage_s']:7.1f} s  {r['docs_per_s']:9,.0f} docs/s  "
                      f"peak {r['peak_mem_mb']:7.0f} MB  index {r['bytes_per_doc']:.0f} B/doc  "
                      f"dups {r['exact_dup']:,} exact + {r['near_dup']:,} near "
                      f"(planted {made['planted_exact']:,} + {made['planted_near']:,})", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    local = results.get("local", {})
    exponent = round(slope([int(k) for k in local], [v["stage_s"] for v in local.values()]), 3) \
        if len(local) >= 2 else None
    out = {
        "sizes": sizes,
        "docs_per_s": {e: {k: v["docs_per_s"] for k, v in r.items()} for e, r in results.items()},
        "peak_mem_mb": {e: {k: v["peak_mem_mb"] for k, v in r.items()} for e, r in results.items()},
        "stage_s": {e: {k: v["stage_s"] for k, v in r.items()} for e, r in results.items()},
        "scaling_exponent": exponent,
        "near_recall": {e: {k: v["near_recall"] for k, v in r.items()} for e, r in results.items()},
        "bytes_per_doc": max((v["bytes_per_doc"] for r in results.values() for v in r.values()), default=None),
        "duplicates_found": all(v["found_exact"] and v["found_near"] for r in results.values() for v in r.values()),
    }
    if "ray" in results and local:
        out["ray_time_vs_local"] = {k: round(results["ray"][k]["stage_s"] / local[k]["stage_s"], 3)
                                    for k in local if k in results["ray"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
