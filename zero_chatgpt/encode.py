"""Encode the cleaned corpus (RUN_DIR/data) into token shards (RUN_DIR/tokens).

One token shard per corpus shard: data/train-00003.jsonl.zst -> tokens/train-00003.bin,
in the `zero_chatgpt.tokens` format (each document's ids followed by <|endoftext|>,
uint16 when the vocabulary fits). Encoding runs on every core: with few shards, tiktoken's
Rust encoder (which releases the GIL) runs in a thread pool while the main thread
decompresses and parses the next batch and writes the last one; with many shards, whole
shards go to worker processes (see `_run_jobs`).

Resumable: `tokens/manifest.json` records each finished shard with the tokenizer and
the source file it came from; a rerun skips shards whose record still matches and whose
file opens cleanly, and redoes the rest (a killed writer leaves only a .tmp file).
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from zero_chatgpt import tokens as tokens_mod
from zero_chatgpt.console import UserError, info, progress
from zero_chatgpt.io import atomic_write_json, corpus_shards

MANIFEST = "manifest.json"
BATCH_CHARS = 4 << 20     # characters handed to the thread pool at a time
CHUNK_DOCS = 64           # documents per task inside a batch


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def count_lines(path: Path) -> int:
    """Documents in a .jsonl.zst shard, for the progress bar (zstd streams at ~1 GB/s)."""
    n = 0
    with open(path, "rb") as fh:
        for chunk in zstandard.ZstdDecompressor().read_to_iter(fh, read_size=1 << 20, write_size=1 << 20):
            n += chunk.count(b"\n")
    return n


def _batches(path: Path) -> Iterator[list[str]]:
    from zero_chatgpt.tokenizer import shard_texts
    batch, size = [], 0
    for text in shard_texts(path):
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ShardEncoder:
    """Encode documents with a thread pool; each result already ends with <|endoftext|>."""

    def __init__(self, tok, num_threads: int):
        self.enc = tok.enc
        self.eot = tok.eot_id
        self.dtype = tokens_mod.dtype_for_vocab(tok.vocab_size)
        self.pool = ThreadPoolExecutor(num_threads)

    def _encode_chunk(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for t in texts:
            # encode_to_numpy with no disallowed specials == encode_ordinary (specials in the
            # text are plain text), without building a Python list of ints.
            ids = self.enc.encode_to_numpy(t, disallowed_special=())
            doc = np.empty(len(ids) + 1, dtype=self.dtype)
            doc[:-1] = ids
            doc[-1] = self.eot
            out.append(doc)
        return out

    def submit(self, batch: list[str]):
        return [self.pool.submit(self._encode_chunk, batch[i:i + CHUNK_DOCS])
                for i in range(0, len(batch), CHUNK_DOCS)]

    def close(self):
        self.pool.shutdown()


def encode_shard(src: Path, dst: Path, tok, encoder: ShardEncoder, bar) -> dict:
    writer = tokens_mod.ShardWriter(dst, tok.vocab_size)
    stats = {"docs": 0, "tokens": 0, "chars": 0}
    try:
        pending: deque = deque()

        def drain_one():
            for fut in pending.popleft():
                for doc in fut.result():
                    writer.add(doc)
                    stats["docs"] += 1
                    stats["tokens"] += len(doc)
                    bar.update(1)

        for batch in _batches(src):
            stats["chars"] += sum(len(t) for t in batch)
            pending.append(encoder.submit(batch))
            while len(pending) > 1:   # keep one batch encoding while the next is read
                drain_one()
        while pending:
            drain_one()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return stats


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _encode_in_process(tokenizer_dir: str, src: Path, dst: Path) -> dict:
    """One shard in a worker process (single-threaded: the processes are the parallelism)."""
    from zero_chatgpt.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer_dir, num_threads=1)
    encoder = ShardEncoder(tok, 1)
    try:
        return encode_shard(src, dst, tok, encoder, _NoBar())
    finally:
        encoder.close()


def _run_jobs(jobs: list, tok, tokenizer_dir: Path, bar) -> Iterator[tuple]:
    """Yield (job, stats) as shards finish.

    With at least two shards per core, whole shards go to worker processes: each parses its
    own JSON, so reading scales with the cores too (one reader thread parses ~75 MB/s, the
    throughput of ~7 encoding cores). With fewer shards (the demo writes a few uneven ones),
    one process reads and a thread pool encodes every shard in turn, so a big shard still
    uses every core.
    """
    n = tok.num_threads
    if n > 1 and len(jobs) >= 2 * n:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from concurrent.futures.process import BrokenProcessPool
        left = list(jobs)
        try:
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(_encode_in_process, str(tokenizer_dir), job[1], job[2]): job for job in jobs}
                for fut in as_completed(futures):
                    stats = fut.result()
                    bar.update(stats["docs"])
                    left.remove(futures[fut])
                    yield futures[fut], stats
            return
        except BrokenProcessPool as e:
            # e.g. a __main__ that spawned workers cannot re-import (code piped to python)
            info(f"tokens: worker processes failed ({e}); encoding the remaining {len(left)} shards here")
            jobs = left
    encoder = ShardEncoder(tok, n)
    try:
        for job in jobs:
            yield job, encode_shard(job[1], job[2], tok, encoder, bar)
    finally:
        encoder.close()


def _token_path(tokens_dir: Path, src: Path) -> Path:
    return tokens_dir / (src.name.split(".", 1)[0] + ".bin")


def encode_corpus(ctx, tok, tokenizer_key: str) -> dict:
    """Encode data/{train,val} into tokens/; returns {split: {docs, tokens, chars}}."""
    from zero_chatgpt.rundir import mark_complete, read_marker, stage_key
    rd = ctx.run_dir
    out = rd.stage_dir("tokens")
    key = stage_key(ctx.cfg, ["tokenizer"], [rd.tokenizer], extra={"tokenizer": tokenizer_key})
    if ctx.up_to_date(out, key, "tokens"):
        return read_marker(out).get("summary", {})
    tok_sha = _file_sha(rd.tokenizer / "tokenizer.json")
    manifest_path = out / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        manifest = {}
    if manifest.get("tokenizer") != tok_sha or ctx.force:
        manifest = {"tokenizer": tok_sha, "shards": {}}
    done = manifest["shards"]

    jobs, expected = [], set()
    for split in ("train", "val"):
        sources = corpus_shards(rd.data, split)
        if not sources and split == "train":
            raise UserError(f"no train corpus shards in {rd.data}; run `zero-chatgpt data` first")
        for src in sources:
            dst = _token_path(out, src)
            expected.add(dst.name)
            st = src.stat()
            ident = {"source": src.name, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
            rec = done.get(dst.name)
            if rec and all(rec.get(k) == v for k, v in ident.items()) and dst.exists():
                try:
                    tokens_mod.open_shard(dst)
                    continue
                except UserError:
                    pass
            jobs.append((split, src, dst, ident))
    for stale in out.glob("*.bin"):
        if stale.name not in expected:
            stale.unlink()
    for name in [n for n in done if n not in expected]:
        del done[name]
    for tmp in out.glob("*.bin.tmp"):     # left by a killed writer
        tmp.unlink()
    if len(jobs) < len(expected):
        info(f"tokens: {len(expected) - len(jobs)} of {len(expected)} shards already encoded, resuming")

    total_docs = sum(count_lines(src) for _, src, _, _ in jobs)
    with progress(total=total_docs, desc="encoding", unit="doc") as bar:
        for (split, src, dst, ident), stats in _run_jobs(jobs, tok, rd.tokenizer, bar):
            done[dst.name] = {**ident, "split": split, **stats}
            atomic_write_json(manifest_path, manifest)

    summary: dict = {}
    for rec in done.values():
        s = summary.setdefault(rec["split"], {"shards": 0, "docs": 0, "tokens": 0, "chars": 0})
        s["shards"] += 1
        for k in ("docs", "tokens", "chars"):
            s[k] += rec[k]
    mark_complete(out, key, summary)
    return summary
