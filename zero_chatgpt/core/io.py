"""File helpers shared by readers and writers: transparent .gz/.zst, JSON-lines shards.

Corpus shards (the output of the data stage, the input of the tokenizer) are
zstd-compressed JSON lines, one document per line, with at least a "text" field:
    RUN_DIR/data/train-00000.jsonl.zst, RUN_DIR/data/val-00000.jsonl.zst, ...

A damaged compressed file never reads as a shorter clean one: a truncated .gz or .zst
raises EOFError at its end, corrupt data an error of DECOMPRESSION_ERRORS.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import IO, Iterator

import zstandard

# What reading a damaged file through open_binary can raise: OSError (a non-gzip file named
# .gz, I/O errors), EOFError (a truncated .gz or .zst), zlib.error (corrupt deflate data),
# ZstdError (corrupt zstd data).
DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
_READ = 1 << 20


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """Open a file for streaming reads, decompressing .gz and .zst transparently."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        return io.BufferedReader(_ZstdReader(path), buffer_size=_READ)
    return open(path, "rb", buffering=_READ)


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file, all its frames; EOFError if the file ends inside one.

    python-zstandard's stream_reader stops quietly where the input stops, so a download cut
    at 3 % would read as a short clean file. The compressed bytes reach it through a
    _ZstdFrameWalk, which knows whether the input ended between frames. (Its decompressobj
    would know too, but it returns all the output of a read at once: 1 MiB of highly
    repetitive input can be gigabytes. stream_reader bounds the output of each read.)
    """

    def __init__(self, path: Path):
        self.name = str(path)
        self._walk = _ZstdFrameWalk(open(path, "rb"))
        self._z = zstandard.ZstdDecompressor().stream_reader(self._walk, read_size=_READ, read_across_frames=True,
                                                              closefd=True)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._z.readinto(b)
        if n == 0 and not self._walk.finished():
            raise EOFError("truncated zstd frame: the file ends inside compressed data (an interrupted download "
                           "or copy?); get the file again")
        return n

    def close(self) -> None:
        if not self.closed:
            self._z.close()  # and the file (closefd)
        super().close()


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # ... to 0x184D2A5F


class _ZstdFrameWalk:
    """A file wrapper that follows the zstd frame structure (RFC 8878) of the bytes read through it.

    Only frame headers and block headers are parsed, block contents are skipped unread: a
    few Python steps per block (at most 128 KiB of output), nothing decompressed. After the
    last read, `finished()` says whether the file ended between two frames, as a whole file
    does. Bytes it cannot place (not a zstd frame) are left to the decompressor to report.
    """

    def __init__(self, fh):
        self._fh = fh
        self._eof = False
        self._lost = False         # not zstd data: the decompressor raises ZstdError for it
        self._skip = 0             # bytes to pass over first (a block's content, a checksum, a header's rest)
        self._want = 4             # then the size of the next header field ...
        self._step = self._magic   # ... and the method that reads it
        self._part = b""           # the bytes of that field seen so far
        self._checksum = 0         # bytes of checksum after the current frame's last block

    def read(self, size: int = -1) -> bytes:
        data = self._fh.read(size)
        if not data:
            self._eof = True
        elif not self._lost:
            self._feed(data)
        return data

    def close(self) -> None:
        self._fh.close()

    def finished(self) -> bool:
        between_frames = self._step == self._magic and not self._part and not self._skip
        return self._eof and (between_frames or self._lost)

    def _feed(self, data: bytes) -> None:
        i = 0
        while i < len(data) and not self._lost:
            if self._skip:
                k = min(self._skip, len(data) - i)
                self._skip -= k
                i += k
                continue
            k = min(self._want - len(self._part), len(data) - i)
            self._part += data[i:i + k]
            i += k
            if len(self._part) == self._want:
                field, self._part = self._part, b""
                self._step(field)

    def _expect(self, skip: int, want: int, step) -> None:
        self._skip, self._want, self._step = skip, want, step

    def _magic(self, b: bytes) -> None:
        magic = int.from_bytes(b, "little")
        if magic == _ZSTD_MAGIC:
            self._expect(0, 1, self._descriptor)
        elif magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
            self._expect(0, 4, self._skippable)
        else:
            self._lost = True

    def _skippable(self, b: bytes) -> None:
        self._expect(int.from_bytes(b, "little"), 4, self._magic)

    def _descriptor(self, b: bytes) -> None:
        d = b[0]
        single_segment = bool(d & 0x20)
        rest = ((0 if single_segment else 1)                              # window descriptor
                + (0, 1, 2, 4)[d & 3]                                     # dictionary id
                + ((1 if single_segment else 0), 2, 4, 8)[d >> 6])        # frame content size
        self._checksum = 4 if d & 0x04 else 0
        self._expect(rest, 3, self._block)

    def _block(self, b: bytes) -> None:
        h = int.from_bytes(b, "little")
        last, kind, size = h & 1, (h >> 1) & 3, h >> 3
        if kind == 3:  # reserved: corrupt data
            self._lost = True
            return
        content = 1 if kind == 1 else size  # an RLE block holds one byte, repeated `size` times
        if last:
            self._expect(content + self._checksum, 4, self._magic)
        else:
            self._expect(content, 3, self._block)


def open_text(path: str | os.PathLike, errors: str = "strict") -> IO[str]:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", errors=errors, newline="")


class JsonlZstWriter:
    """Write JSON lines into a .jsonl.zst file atomically (tmp file + rename on close)."""

    def __init__(self, path: str | os.PathLike, level: int = 3):
        self.path = Path(path)
        # the writer's pid in the name: two writers (a rerun and a dying worker) never share a file
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
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
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
    except OSError as e:          # a failed write names no file by itself (a full disk, a size limit)
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
