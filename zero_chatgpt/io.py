"""File helpers shared by readers and writers: transparent .gz/.zst, JSON-lines shards.

Corpus shards (the output of the data stage, the input of the tokenizer) are
zstd-compressed JSON lines, one document per line, with at least a "text" field:
    RUN_DIR/data/train-00000.jsonl.zst, RUN_DIR/data/val-00000.jsonl.zst, ...
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import IO, Iterator

import zstandard


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for streaming reads, decompressing .gz and .zst transparently."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        fh = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(fh, closefd=True, read_size=1 << 20)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def open_text(path: str | os.PathLike, errors: str = "strict") -> IO[str]:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors=errors, newline="")


class JsonlZstWriter:
    """Write JSON lines into a .jsonl.zst file atomically (tmp file + rename on close)."""

    def __init__(self, path: str | os.PathLike, level: int = 3):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._fh = open(self.tmp, "wb")
        self._z = zstandard.ZstdCompressor(level=level).stream_writer(self._fh, closefd=False)
        self.count = 0

    def write(self, record: dict) -> None:
        self._z.write(json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n")
        self.count += 1

    def close(self) -> None:
        self._z.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._z.close()
            self._fh.close()
            self.tmp.unlink(missing_ok=True)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Records of a JSON-lines file we wrote ourselves (trusted: no bad-record accounting)."""
    with open_binary(path) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def corpus_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The cleaned corpus shards of one split ("train" or "val"), in order."""
    return sorted(Path(data_dir).glob(f"{split}-*.jsonl.zst"))


def iter_corpus_texts(data_dir: str | os.PathLike, split: str) -> Iterator[str]:
    for shard in corpus_shards(data_dir, split):
        for rec in iter_jsonl(shard):
            yield rec["text"]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
