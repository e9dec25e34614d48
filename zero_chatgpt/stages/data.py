"""The data stage: read → clean → exact + near dedup → train/val shards + stats.json.

    zero-chatgpt data --run-dir D [--source FORMAT:PATH ...]

1. The main process streams records from the sources (or the built-in corpus) and cuts them
   into parts of `data.shard_docs` documents. A pool of processes (all cores by default)
   cleans each part and writes, atomically, `D/data/work/part-NNNNN.{jsonl.zst,npz,json}`:
   the kept documents, their exact hashes + LSH band keys, and the part's counts. A killed
   run resumes: parts whose `.json` exists are not cleaned again.
2. Exact duplicates (first occurrence kept), then near duplicates over the band keys of all
   parts (~128 bytes per document), verified on the documents' true shingle Jaccard, merged
   with union-find (dedup.py): as tasks on the same executor, partitioned by hash, by band and
   by chunk of candidate pairs (dedup_parts.py), so the driver never holds the index.
3. The pool writes the kept documents of each part to `D/data/train-NNNNN.jsonl.zst` /
   `val-NNNNN.jsonl.zst` (the split is a stable hash of the text), and the main process
   writes `D/data/stats.json` and prints the funnel. The accounting is exact:
   docs_in = docs_out + sum(dropped) + bad_records.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from zero_chatgpt.core.console import info, progress, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import source_fingerprints
from zero_chatgpt.core.io import JsonlZstWriter, atomic_write_json, iter_jsonl
from zero_chatgpt.core.rundir import Context, begin, inputs_or_recorded
from zero_chatgpt.core.settings import DataSection
from zero_chatgpt.core.workers import command_alive, fault_point
from zero_chatgpt.data import builtin
from zero_chatgpt.data.clean import DEDUP_REASONS, REASONS, Cleaner, funnel_rows
from zero_chatgpt.data.dedup import MinHasher, exact_hash
from zero_chatgpt.data.dedup_parts import deduplicate
from zero_chatgpt.data.executors import executor_for
from zero_chatgpt.data.sources import iter_records, parse_source
from zero_chatgpt.data.streams import BadRecords


def _workers(cfg: DataSection) -> int:
    n = cfg.workers
    return n if n > 0 else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def iter_input(cfg: DataSection, bad: BadRecords) -> Iterator[dict]:
    """Text records of every configured source, in order; the built-in corpus when there are none."""
    if not cfg.sources:
        yield from builtin.iter_builtin_documents(tuple(cfg.builtin_parts), cfg.idioms,
                                                  cfg.idiom_texts)
        return
    for spec in cfg.sources:
        src = parse_source(spec)
        if src.kind != "text":
            raise UserError(f"--source {spec}: {src.fmt} is a {src.kind} format (for `zero-chatgpt sft`); "
                            f"the data stage reads text, jsonl, parquet, wikipedia-cn, baidubaike, skypile")
        yield from iter_records(src, bad, text_field=cfg.text_field, text_unit=cfg.text_unit,
                                max_record_bytes=cfg.max_record_bytes)


# ── phase 1: clean one part (in a worker) ──────────────────────────────────────────────────────

def _part_paths(work: Path, i: int) -> dict[str, Path]:
    stem = work / f"part-{i:05d}"
    return {"docs": stem.with_suffix(".jsonl.zst"), "index": stem.with_suffix(".npz"),
            "stats": stem.with_suffix(".json")}


def _hasher(cfg: DataSection) -> MinHasher:
    return MinHasher(cfg.minhash_perm, cfg.shingle_chars, cfg.lsh_bands, cfg.minhash_seed,
                     cfg.near_threshold)


def clean_part(cfg: DataSection, work: Path, i: int, records: list[dict], command_pid: int) -> dict:
    """Clean one part and write its kept documents, index arrays and counts (the .json last).

    The .json is what makes a part count as finished (a rerun after a kill reuses it), so it is
    published only while the command that asked for it still runs: a worker that outlived a
    killed command (for the few milliseconds its watchdog allows) never publishes a part."""
    fault_point(f"part-{i}")
    cleaner = Cleaner(cfg)
    paths = _part_paths(work, i)
    dropped: Counter = Counter()
    samples: dict[str, list] = {}
    kept: list[dict] = []
    chars_in = 0
    by_source: dict[str, list[int]] = {}
    for rec in records:
        chars_in += len(rec["text"])
        src = by_source.setdefault(rec["source"], [0, 0])
        src[0] += 1
        text, reason = cleaner.clean(rec)
        if reason is not None:
            dropped[reason] += 1
            if len(samples.setdefault(reason, [])) < cfg.drop_samples:
                samples[reason].append({"where": rec["where"], "text": rec["text"][:300]})
            continue
        out = {"text": text, "source": rec["source"], "where": rec["where"]}
        if rec.get("meta"):
            out["meta"] = rec["meta"]
        kept.append(out)
    texts = [d["text"] for d in kept]
    exact = np.fromiter((exact_hash(t) for t in texts), dtype=np.uint64, count=len(texts))
    if cfg.near_dedup:
        hasher = _hasher(cfg)
        # a part whose documents were all dropped still has one column per band (it is concatenated)
        keys = hasher.keys_for(texts) if texts else np.zeros((0, hasher.bands), dtype=np.uint64)
    else:
        keys = np.zeros((len(texts), 0), dtype=np.uint64)
    with JsonlZstWriter(paths["docs"]) as w:
        for d in kept:
            w.write(d)
    tmp = paths["index"].with_name(f"{paths['index'].name}.tmp{os.getpid()}.npz")
    np.savez(tmp, exact=exact, keys=keys)
    os.replace(tmp, paths["index"])
    stats = {"part": i, "docs_in": len(records), "chars_in": chars_in, "kept": len(kept),
             "dropped": dict(dropped), "samples": samples, "pii_masked": dict(cleaner.pii),
             "sources": sorted(by_source), "source_in": {k: v[0] for k, v in by_source.items()},
             "command_pid": command_pid, "written": time.time()}
    if os.environ.get("ZC_RAY_TASK") != "1" and not command_alive(command_pid):
        os._exit(1)
    atomic_write_json(paths["stats"], stats)
    return stats


def _write_part(cfg: DataSection, work: Path, out_dir: Path, i: int, keep: np.ndarray) -> dict:
    """Write the kept documents of part i to train-/val- shards; return counts by split and source."""
    paths = _part_paths(work, i)
    val_cut = int(cfg.val_fraction * 2**32)
    splits: dict[str, list] = {"train": [], "val": []}
    for row, doc in enumerate(iter_jsonl(paths["docs"])):
        if keep[row]:
            # a stable split by hash of the text: the same document always lands on the same side
            split = "val" if (exact_hash(doc["text"]) & 0xFFFFFFFF) < val_cut else "train"
            splits[split].append(doc)
    counts = {"chars": 0, "train": 0, "val": 0, "source_out": Counter()}
    for split, docs in splits.items():
        path = out_dir / f"{split}-{i:05d}.jsonl.zst"
        if not docs:
            path.unlink(missing_ok=True)
            continue
        with JsonlZstWriter(path) as w:
            for d in docs:
                w.write(d)
                counts["chars"] += len(d["text"])
                counts["source_out"][d["source"]] += 1
        counts[split] = len(docs)
    return counts


# ── the stage ───────────────────────────────────────────────────────────────────────────────────

def _batches(it: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def run_stage(ctx: Context) -> dict:
    cfg = ctx.cfg.data
    out_dir = ctx.run_dir.data
    # the sources enter the key by content (format + fingerprint), not by path or mtime
    inputs = inputs_or_recorded(ctx, "data", ["data.sources"],
                                lambda: {"data.sources": source_fingerprints(cfg.sources, ctx.run_dir.root)})
    run = begin(ctx, "data", extra=inputs)
    if run.skip:
        return json.loads((out_dir / "stats.json").read_text())
    key = run.key
    work = out_dir / "work"
    # a different key (config or inputs changed) invalidates finished parts
    marker = work / "key"
    if work.exists() and (ctx.force or not marker.exists() or marker.read_text() != key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    for old in list(out_dir.glob("train-*.jsonl.zst")) + list(out_dir.glob("val-*.jsonl.zst")):
        old.unlink()

    nworkers = _workers(cfg)
    what = "the built-in corpus" if not cfg.sources else ", ".join(cfg.sources)
    how = "Ray tasks" if cfg.executor == "ray" else f"{nworkers} processes"
    info(f"data: reading {what}; cleaning with {how}")
    try:
        return _clean_dedup_write(ctx, cfg, out_dir, work, run, nworkers)
    except BrokenProcessPool:
        raise UserError(f"data: a worker process died (killed, or out of memory?); the parts already finished "
                        f"are kept in {work}: run the same command again to resume, with fewer "
                        f"--set data.workers or a smaller data.shard_docs if it happens again") from None


def _clean_dedup_write(ctx: Context, cfg: DataSection, out_dir: Path, work: Path, run, nworkers: int) -> dict:
    """Phases 1-3 of the module docstring, and the stage's record."""
    t0 = time.time()
    bad = BadRecords()
    what = "the built-in corpus" if not cfg.sources else ", ".join(cfg.sources)
    part_stats: dict[int, dict] = {}
    resumed: list[dict] = []     # parts finished by an earlier, killed run: which, by whom, when
    bar = progress(desc="clean", unit="doc")
    with executor_for(cfg, nworkers) as pool:
        pending = {}

        def collect(block: bool) -> None:
            """Take in finished parts: all of them (block) or at least one."""
            wait(pending.values(), return_when=ALL_COMPLETED if block else FIRST_COMPLETED)
            for i, fut in list(pending.items()):
                if fut.done():
                    part_stats[i] = fut.result()
                    bar.update(part_stats[i]["docs_in"])
                    del pending[i]

        for i, records in enumerate(_batches(iter_input(cfg, bad), cfg.shard_docs)):
            stats_path = _part_paths(work, i)["stats"]
            if stats_path.exists():  # finished by an earlier, interrupted run
                part_stats[i] = json.loads(stats_path.read_text())
                bar.update(part_stats[i]["docs_in"])
                resumed.append({k: part_stats[i].get(k) for k in ("part", "command_pid", "written")})
                continue
            pending[i] = pool.submit(clean_part, cfg, work, i, records, os.getpid())
            if len(pending) >= 2 * nworkers:  # bounded memory: a few parts in flight
                collect(block=False)
        collect(block=True)
        bar.close()
        if resumed:
            info(f"data: resumed {len(resumed)} finished part(s) from {work}")
        parts = sorted(part_stats)
        t_clean = time.time() - t0
        keep, offsets, dd = deduplicate(cfg, work, [_part_paths(work, i)["index"] for i in parts],
                                        [_part_paths(work, i)["docs"] for i in parts],
                                        [part_stats[i]["kept"] for i in parts], _hasher(cfg).bands,
                                        pool, getattr(pool, "workers", nworkers))
        t_dedup = time.time() - t0 - t_clean
        info(f"data: {dd['exact_dup']:,} exact and {dd['near_dup']:,} near duplicates "
             f"({dd['candidate_pairs']:,} LSH candidate pairs, {dd['verified_pairs']:,} at Jaccard "
             f"≥ {cfg.near_threshold}) in {t_dedup:.1f} s")
        futs = [pool.submit(_write_part, cfg, work, out_dir, i, keep[offsets[k]:offsets[k + 1]])
                for k, i in enumerate(parts)]
        written = [f.result() for f in progress(futs, desc="write", unit="part")]

    dropped = Counter()
    for st in part_stats.values():
        dropped.update(st["dropped"])
    dropped["exact_dup"] = dd["exact_dup"]
    dropped["near_dup"] = dd["near_dup"]
    docs_in = sum(st["docs_in"] for st in part_stats.values()) + bad.count
    docs_out = sum(w["train"] + w["val"] for w in written)
    source_in, source_out, pii = Counter(), Counter(), Counter()
    for st in part_stats.values():
        source_in.update(st["source_in"])
        pii.update(st["pii_masked"])
    for w in written:
        source_out.update(w["source_out"])
    samples: dict[str, list] = {}
    for i in parts:
        for reason, ss in part_stats[i]["samples"].items():
            samples.setdefault(reason, []).extend(ss[: max(0, cfg.drop_samples - len(samples.get(reason, [])))])
    order = [r for r in REASONS if r in dropped] + [r for r in dropped if r not in REASONS and r not in DEDUP_REASONS]
    stats = {
        "docs_in": docs_in,
        "docs_out": docs_out,
        "chars_in": sum(st["chars_in"] for st in part_stats.values()),
        "chars_out": sum(w["chars"] for w in written),
        "train_docs": sum(w["train"] for w in written),
        "val_docs": sum(w["val"] for w in written),
        "dropped": {r: int(dropped[r]) for r in order + list(DEDUP_REASONS)},
        "bad_records": bad.to_dict(),
        "dropped_samples": samples,
        "by_source": {s: {"docs_in": int(source_in[s]), "docs_out": int(source_out[s])} for s in source_in},
        "pii_masked": dict(pii),
        "dedup": dd,
        "parts": len(parts),
        "resumed_parts": resumed,
        "part_commands": sorted({st.get("command_pid") for st in part_stats.values()}),   # pids that cleaned parts
        "seconds": {"clean": round(t_clean, 2), "dedup": round(t_dedup, 2), "total": round(time.time() - t0, 2)},
    }
    assert stats["docs_in"] == stats["docs_out"] + sum(stats["dropped"].values()) + bad.count, "accounting"
    atomic_write_json(out_dir / "stats.json", stats)
    _print_funnel(stats)
    if bad.count:
        info(f"data: {bad.count:,} bad input record(s), e.g. " +
             "; ".join(f"{s['where']}: {s['reason']}" for s in bad.samples[:3]) + f" (all in {out_dir / 'stats.json'})")
    if docs_out == 0:
        raise UserError(f"data: no document was kept from {what}; see the funnel above and "
                        f"{out_dir / 'stats.json'} (bad records, dropped samples), then fix the sources or the filters")
    run.complete({"docs_out": docs_out, "chars_out": stats["chars_out"]})
    shutil.rmtree(work, ignore_errors=True)  # the parts are a second copy of the corpus: free the disk
    return stats


def _print_funnel(stats: dict) -> None:
    table(["step", "docs", "left", "note"], funnel_rows(stats),
          title=f"data: {stats['docs_in']:,} documents in → {stats['docs_out']:,} out "
                f"({stats['seconds']['total']:.1f} s)")
    if len(stats["by_source"]) > 1:
        table(["source", "docs in", "docs out"],
              [[s, v["docs_in"], v["docs_out"]] for s, v in stats["by_source"].items()])
