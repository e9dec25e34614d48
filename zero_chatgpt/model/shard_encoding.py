"""Encode the cleaned corpus (RUN_DIR/data) into token shards (RUN_DIR/tokens).

One token shard per corpus shard: data/train-00003.jsonl.zst -> tokens/train-00003.bin,
in the `zero_chatgpt.model.token_shards` format (each document's ids followed by <|endoftext|>,
uint16 when the vocabulary fits). Encoding runs on every core: with few shards, tiktoken's
Rust encoder (which releases the GIL) runs in a thread pool while the main thread
decompresses and parses the next batch and writes the last one; with many shards, whole
shards go to worker processes, and with data.executor = "ray" each shard is a Ray task (see
`run_jobs`). The tokenizer stage (stages/tokenizer.py) drives it.

Resumable: `tokens/manifest.json` records each finished shard with the tokenizer and
the source file it came from; a rerun skips shards whose record still matches and whose
file opens cleanly, and redoes the rest (a killed writer leaves only a .tmp file).
"""
from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

import numpy as np
import zstandard

from zero_chatgpt.core.console import info
from zero_chatgpt.core.workers import fault_point, process_pool
from zero_chatgpt.model import token_shards as tokens_mod
from zero_chatgpt.model.tokenizer import load_tokenizer, shard_texts

MANIFEST = "manifest.json"
BATCH_CHARS = 4 << 20     # characters handed to the thread pool at a time
CHUNK_DOCS = 64           # documents per task inside a batch


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def count_lines(path: Path) -> int:
    """Documents in a .jsonl.zst shard, for the progress bar (zstd streams at ~1 GB/s)."""
    n = 0
    with open(path, "rb") as fh:
        for chunk in zstandard.ZstdDecompressor().read_to_iter(fh, read_size=1 << 20, write_size=1 << 20):
            n += chunk.count(b"\n")
    return n


def _batches(path: Path) -> Iterator[list[str]]:
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
    """One shard in a worker process or a Ray task (single-threaded: the tasks are the parallelism)."""
    fault_point("encode-shard")
    tok = load_tokenizer(tokenizer_dir, num_threads=1)
    encoder = ShardEncoder(tok, 1)
    try:
        return encode_shard(src, dst, tok, encoder, _NoBar())
    finally:
        encoder.close()


def run_jobs(jobs: list, tok, tokenizer_dir: Path, bar, executor=None) -> Iterator[tuple]:
    """Yield (job, stats) as shards finish.

    executor: a context manager giving an executor (data.executor = "ray": Ray tasks, see
    data/pipeline.executor_for) that encodes every shard as its own task, wherever the cluster runs it;
    each task writes its shard atomically, so a retried task gives the same bytes.
    Else, with at least two shards per core, whole shards go to worker processes: each parses its
    own JSON, so reading scales with the cores too (one reader thread parses ~75 MB/s, the
    throughput of ~7 encoding cores). With fewer shards (the demo writes a few uneven ones),
    one process reads and a thread pool encodes every shard in turn, so a big shard still
    uses every core.
    """
    n = tok.num_threads
    local = executor is None
    if local and n > 1 and len(jobs) >= 2 * n:
        executor = process_pool(n, "spawn")
    if executor is not None and jobs:
        left = list(jobs)
        try:
            with executor as pool:
                futures = {pool.submit(_encode_in_process, str(tokenizer_dir), job[1], job[2]): job for job in jobs}
                for fut in as_completed(futures):
                    stats = fut.result()
                    bar.update(stats["docs"])
                    left.remove(futures[fut])
                    yield futures[fut], stats
            return
        except BrokenProcessPool as e:
            if not local:
                raise
            # e.g. a __main__ that spawned workers cannot re-import (code piped to python)
            info(f"tokens: worker processes failed ({e}); encoding the remaining {len(left)} shards here")
            jobs = left
    encoder = ShardEncoder(tok, n)
    try:
        for job in jobs:
            yield job, encode_shard(job[1], job[2], tok, encoder, bar)
    finally:
        encoder.close()


def token_path(tokens_dir: Path, src: Path) -> Path:
    return tokens_dir / (src.name.split(".", 1)[0] + ".bin")
