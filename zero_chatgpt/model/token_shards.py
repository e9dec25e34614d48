"""Token shards: the on-disk format between the tokenizer and training.

One shard file (`RUN_DIR/tokens/{train,val}-NNNNN.bin`):

    header   64 bytes: magic b"ZCTOKENS", version u32, itemsize u32 (2 = uint16, 4 = uint32),
             n_tokens u64, n_docs u64, xxh3_64 of the payload u64, 24 reserved bytes
    tokens   n_tokens × itemsize, little-endian (each document ends with <|endoftext|>)
    offsets  (n_docs + 1) × u64: token index where each document starts, then n_tokens

The header says how long the file must be, so truncation is caught on open; the
payload hash catches corruption (checked with `verify=True`, which reads the file).
Shards are written to a temporary file and renamed, so a killed writer never leaves
a half shard under the final name.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import xxhash

from zero_chatgpt.core.errors import UserError

MAGIC = b"ZCTOKENS"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQ24x")
assert HEADER.size == 64


class ShardError(UserError):
    """A token shard that is truncated, corrupted or not a shard at all."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class ShardWriter:
    """Append documents (already ending with the end-of-text id), then close() to publish."""

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.dtype = dtype_for_vocab(vocab_size)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")   # one writer per file name
        self._fh = open(self.tmp, "wb")
        self._fh.write(b"\0" * HEADER.size)
        self._hash = xxhash.xxh3_64()
        self._offsets = [0]
        self.n_tokens = 0

    def add(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        buf = arr.tobytes()
        self._fh.write(buf)
        self._hash.update(buf)
        self.n_tokens += len(arr)
        self._offsets.append(self.n_tokens)

    def close(self) -> Path:
        offsets = np.asarray(self._offsets, dtype="<u8").tobytes()
        self._fh.write(offsets)
        self._hash.update(offsets)
        self._fh.seek(0)
        self._fh.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.n_tokens,
                                   len(self._offsets) - 1, self._hash.intdigest()))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._fh.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(path: str | os.PathLike, docs: Iterable[Sequence[int]], vocab_size: int) -> Path:
    w = ShardWriter(path, vocab_size)
    try:
        for d in docs:
            w.add(d)
    except BaseException:
        w.abort()
        raise
    return w.close()


@dataclass
class TokenShard:
    path: Path
    tokens: np.memmap        # all tokens of the shard, memory-mapped
    doc_offsets: np.ndarray  # (n_docs + 1,) start of each document, then n_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]


def open_shard(path: str | os.PathLike, verify: bool = False) -> TokenShard:
    """Memory-map a shard; raise ShardError naming the file if it is not intact."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(HEADER.size)
    if len(head) < HEADER.size:
        raise ShardError(f"{path}: token shard truncated ({size} bytes, header needs {HEADER.size}); "
                         f"delete it and rerun `zero-chatgpt tokenizer --force`")
    magic, version, itemsize, n_tokens, n_docs, digest = HEADER.unpack(head)
    if magic != MAGIC:
        raise ShardError(f"{path}: not a zero-chatgpt token shard (bad magic {magic!r})")
    if version != VERSION or itemsize not in (2, 4):
        raise ShardError(f"{path}: unsupported shard version {version} / item size {itemsize}")
    expected = HEADER.size + n_tokens * itemsize + (n_docs + 1) * 8
    if size != expected:
        raise ShardError(f"{path}: token shard truncated or padded ({size} bytes, header says {expected}); "
                         f"delete it and rerun `zero-chatgpt tokenizer --force`")
    if verify:
        h = xxhash.xxh3_64()
        with open(path, "rb") as fh:
            fh.seek(HEADER.size)
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        if h.intdigest() != digest:
            raise ShardError(f"{path}: token shard corrupted (payload hash mismatch); "
                             f"delete it and rerun `zero-chatgpt tokenizer --force`")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER.size, shape=(n_tokens,))
    offsets = np.fromfile(path, dtype="<u8", count=n_docs + 1, offset=HEADER.size + n_tokens * itemsize)
    if n_docs and (offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets.astype(np.int64)) < 0)):
        raise ShardError(f"{path}: token shard has an invalid document index")
    return TokenShard(path, tokens, offsets)


def shard_paths(tokens_dir: str | os.PathLike, split: str) -> list[Path]:
    return sorted(Path(tokens_dir).glob(f"{split}-*.bin"))


def load_split(tokens_dir: str | os.PathLike, split: str, verify: bool = False) -> list[TokenShard]:
    """All shards of a split ("train" / "val"), memory-mapped, in order."""
    paths = shard_paths(tokens_dir, split)
    if not paths:
        raise UserError(f"no {split} token shards in {tokens_dir}; run `zero-chatgpt tokenizer` first")
    return [open_shard(p, verify=verify) for p in paths]
