"""The low-level readers under data/sources.py: capped lines, JSON lines, one huge JSON array
element by element, plain-text documents, parquet batches, and the BadRecords that every one of
them reports to.

Each reader streams (nothing is loaded whole), caps one record at data.max_record_bytes UTF-8
bytes, and turns whatever it cannot read into one counted bad record with its `file:line`, never
an exception: an empty file, a truncated or corrupt .gz / .zst (io.open_binary), invalid UTF-8,
malformed JSON, a record too long. Only configuration errors raise (UserError).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import DECOMPRESSION_ERRORS, open_binary

_CHUNK = 1 << 20  # bytes read at a time by the JSON-array reader
MAX_RECORD_BYTES = 16 << 20  # default cap on one line / one JSON element (data.max_record_bytes)


@dataclass
class BadRecords:
    """Unusable input records: a count, counts by reason, and the first few with file:line."""
    max_samples: int = 20
    count: int = 0
    by_reason: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        self.by_reason[reason.split(":")[0]] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append({"where": where, "reason": reason})

    def merge(self, other: "BadRecords | dict") -> None:
        d = other.to_dict() if isinstance(other, BadRecords) else other
        self.count += d["count"]
        self.by_reason.update(d["by_reason"])
        self.samples.extend(d["samples"][: max(0, self.max_samples - len(self.samples))])

    def to_dict(self) -> dict:
        return {"count": self.count, "by_reason": dict(self.by_reason), "samples": list(self.samples)}


def iter_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without the newline); over-long / non-UTF-8 lines go to `bad`.

    A file that cannot be read (truncated, not what its compression suffix says) is one bad
    record where it fails; one with nothing but blank lines is one "empty file".
    """
    n, content = 0, False
    try:
        with open_binary(path) as fh:
            while raw := fh.readline(max_bytes + 1):
                n += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    content = True
                    size = len(raw) + _skip_line(fh)
                    bad.add(f"{path}:{n}", f"line too long: {size:,} bytes > data.max_record_bytes={max_bytes:,}")
                    continue
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    content = True
                    bad.add(f"{path}:{n}", f"invalid UTF-8: {e.reason} at byte {e.start}")
                    continue
                content = content or bool(line.strip())  # the readers skip what str.strip() blanks
                yield n, line
    except DECOMPRESSION_ERRORS as e:  # truncated .gz / .zst, a plain file named .gz, unreadable file
        bad.add(f"{path}:{n + 1}", f"unreadable: {e}")
        return
    if not content:
        bad.add(f"{path}:0", "empty file" if n == 0 else "empty file: only blank lines")


def _skip_line(fh) -> int:
    """Read past the rest of an over-long line without holding it; its size in bytes."""
    size = 0
    while raw := fh.readline(1 << 20):
        size += len(raw)
        if raw.endswith(b"\n"):
            break
    return size


def json_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
    for n, line in iter_lines(path, bad, max_bytes):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            bad.add(where, _json_error(e))
            continue
        if not isinstance(obj, dict):
            bad.add(where, f"not a JSON object: {_json_type(obj)}")
            continue
        yield where, obj


def _json_error(e: Exception, line: int | None = None) -> str:
    """The reason for a JSON text json could not decode: what, and where in the line (or at which line).

    json's own messages may end in "at" ("Unterminated string starting at"): it is not doubled.
    """
    if isinstance(e, RecursionError):
        return "malformed JSON: nested too deeply"
    if not isinstance(e, json.JSONDecodeError):  # e.g. an integer of more than 4300 digits
        return f"malformed JSON: {e}"
    msg = e.msg.removesuffix(" at")
    return f"malformed JSON: {msg} at column {e.colno}" if line is None else f"malformed JSON: {msg} at line {line}"


def _json_type(obj) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(obj), type(obj).__name__)


def json_array(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
    """Elements of one (possibly huge) top-level JSON array, decoded from a sliding buffer.

    A file that does not start with `[` is read as JSON lines instead. A file that cannot
    be read (truncated .gz / .zst, not gzip data) is one bad record where the reading stops.
    """
    reader = None
    try:
        with open_binary(path) as fh:
            reads = _Reads(fh)
            head = _read_head(reads, max_bytes)
            if not head.strip():
                bad.add(f"{path}:0", "empty file")
                return
            if head.lstrip().startswith(b"["):
                reader = _ArrayReader(reads, head, path, bad, max_bytes)
                yield from reader
                return
    except DECOMPRESSION_ERRORS as e:
        bad.add(f"{path}:{reader.line if reader else 1}", f"unreadable: {e}")
        return
    yield from json_lines(path, bad, max_bytes)


class _Reads:
    """Reads of `size` bytes (fewer only at the end) that keep the data before a read error.

    A plain `read(size)` of a truncated .gz / .zst raises and drops the good bytes it had
    decompressed before the cut, up to a chunk of elements. Here they are returned, and the
    error is kept in `error` (reads then return b""): the reader raises it once it has used
    the data before it.
    """

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def read(self, size: int) -> bytes:
        parts, n = [], 0
        while n < size and self.error is None:
            try:
                data = self.fh.read1(size - n)
            except DECOMPRESSION_ERRORS as e:
                self.error = e
                break
            if not data:
                break
            parts.append(data)
            n += len(data)
        return b"".join(parts)


def _read_head(reads: _Reads, max_bytes: int) -> bytes:
    """The first chunk of a file, read on through leading whitespace (up to max_bytes of it)."""
    head = reads.read(_CHUNK)
    while head and not head.strip() and len(head) < max_bytes:
        more = reads.read(_CHUNK)
        if not more:
            break
        head += more
    if not head.strip() and reads.error is not None:
        raise reads.error
    return head


_SKIP = object()  # _ArrayReader._element: the element was reported to `bad`


class _ArrayReader:
    """Iterate (file:line, object) over the elements of a JSON array whose first bytes are `head`.

    The buffer `buf` holds decoded text from `pos` on; reads append to it. An element cut by
    the end of the buffer is decoded again after reading more (doubling, so a long element
    costs linear time), but never past data.max_record_bytes UTF-8 bytes: memory stays
    bounded by the cap. Text is decoded with `surrogateescape`, so invalid UTF-8 inside an
    element shows up as lone surrogates and that element alone is reported. After a
    malformed element the reader resynchronises at the next `},{`.
    """

    def __init__(self, fh: _Reads, head: bytes, path: Path, bad: BadRecords, max_bytes: int):
        self.fh, self.path, self.bad, self.max_bytes = fh, path, bad, max_bytes
        self.chunk = _CHUNK
        self.dec = json.JSONDecoder()
        cut = _utf8_cut(head)
        self.buf, self.pending = head[:cut].decode("utf-8", "surrogateescape"), head[cut:]
        self.pos = self.buf.index("[") + 1
        self.line = 1 + self.buf.count("\n", 0, self.pos)
        self.eof = False
        self.done = False  # the input ended while resynchronising after a malformed element

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        elements = 0
        while self._skip_separators():
            if self.buf[self.pos] == "]":
                self._check_end(elements)
                return
            where = f"{self.path}:{self.line}"
            elements += 1
            obj = self._element(where)
            if self.done:
                return
            if obj is _SKIP:
                continue
            if not isinstance(obj, dict):
                self.bad.add(where, f"not a JSON object: {_json_type(obj)}")
                continue
            if any(isinstance(v, str) and has_surrogates(v) for v in obj.values()):
                self.bad.add(where, "invalid UTF-8 in the element")
                continue
            yield where, obj
        self.bad.add(f"{self.path}:{self.line}", "malformed JSON: the array is not closed with ]")

    def _more(self, size: int, ahead: bool = False) -> bool:
        """Append up to `size` more bytes to the buffer (dropping what is before pos); False at the end.

        The file's read error, if any, is raised here, except when reading `ahead` (the buffer
        still holds data to use first).
        """
        data = self.fh.read(size)
        if not data:
            if self.fh.error is None:
                self.eof = True
            elif not ahead:
                raise self.fh.error
            return False
        data = self.pending + data
        cut = _utf8_cut(data)  # do not split a UTF-8 sequence between reads
        self.pending = data[cut:]
        self.buf = self.buf[self.pos:] + data[:cut].decode("utf-8", "surrogateescape")
        self.pos = 0
        return True

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end
        if len(self.buf) - self.pos < self.chunk // 2 and not self.eof:
            self._more(self.chunk, ahead=True)

    def _skip_separators(self) -> bool:
        """Move pos past whitespace and commas, reading on; False at the end of input."""
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                if buf[pos] == "\n":
                    self.line += 1
                pos += 1
            self.pos = pos
            if pos < len(buf) or not self._more(self.chunk):
                return pos < len(buf)

    def _element(self, where: str):
        """Decode the element at pos and move past it; _SKIP once an unusable one is reported."""
        while True:
            try:
                obj, end = self.dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # cut by the end of the buffer (an error within the last few characters: a half
                # escape, literal or delimiter) rather than malformed further back: read on
                cut = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if cut and self._read_on():
                    continue
                over = cut and self._over_cap(len(self.buf), len(self.pending))
                self._reject(where, self._too_long() if over else
                             _json_error(e, self.line + self.buf.count("\n", self.pos, e.pos)))
                return _SKIP
            except (ValueError, RecursionError) as e:  # a 5000-digit number, [[[[... nested too deep
                self._reject(where, _json_error(e))
                return _SKIP
            if len(self.buf) - end < 3 and self.buf[end - 1] not in '}]"' and self._read_on():
                continue  # a number at the end of the buffer may go on: `1` of `12`, `1.5` of `1.5e+3`
            if self._over_cap(end):
                self.bad.add(where, self._too_long())
                self._advance(end)
                return _SKIP
            self._advance(end)
            return obj

    def _too_long(self) -> str:
        return f"element too long: > data.max_record_bytes={self.max_bytes:,} bytes"

    def _over_cap(self, end: int, extra: int = 0) -> bool:
        """Whether buf[pos:end] and `extra` more bytes are over the cap in UTF-8 bytes."""
        n = end - self.pos
        if n + extra > self.max_bytes:  # at least one byte a character
            return True
        if 4 * n + extra <= self.max_bytes:  # at most four
            return False
        return len(self.buf[self.pos:end].encode("utf-8", "surrogateescape")) + extra > self.max_bytes

    def _read_on(self) -> bool:
        """Read more of an element that runs past the buffer, up to one byte over the cap."""
        if self.eof or self._over_cap(len(self.buf), len(self.pending)):
            return False
        have = len(self.buf[self.pos:].encode("utf-8", "surrogateescape")) + len(self.pending)
        return self._more(min(max(self.chunk, have), self.max_bytes + 1 - have))

    def _reject(self, where: str, reason: str) -> None:
        """Report the element at pos and resynchronise at the `{` of the next one (memory bounded)."""
        self.bad.add(where, reason)
        start = self.pos + 1
        while True:
            j = _next_boundary(self.buf, start)
            if j >= 0:
                self.line += self.buf.count("\n", self.pos, j)
                self.pos = j
                return
            # keep only what may begin a boundary: a last `}` followed by whitespace and commas
            k = self.buf.rfind("}", start)
            keep = k if k >= 0 and not self.buf[k + 1:].strip(" \t\r\n,") else len(self.buf)
            self.line += self.buf.count("\n", self.pos, keep)
            self.pos, start = keep, 0
            if not self._more(self.chunk):
                self.done = True
                return

    def _check_end(self, elements: int) -> None:
        """After the closing `]`: an empty array is an empty file, and data after it is reported."""
        where = f"{self.path}:{self.line}"
        if not elements:
            self.bad.add(where, "empty file: an empty JSON array")
        self.pos += 1
        while True:
            rest = self.buf[self.pos:].strip()
            if rest or self.pending:
                self.bad.add(where, "malformed JSON: data after the closing ] of the array (not read)")
                return
            self.pos = len(self.buf)
            if not self._more(self.chunk):
                return


def _utf8_cut(data: bytes) -> int:
    """Length of the prefix of `data` that ends on a UTF-8 character boundary."""
    i = len(data) - 1
    while i >= 0 and i > len(data) - 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i >= 0 and data[i] >= 0xC0:
        need = 2 if data[i] < 0xE0 else 3 if data[i] < 0xF0 else 4
        if len(data) - i < need:
            return i
    return len(data)


def _next_boundary(buf: str, start: int) -> int:
    """Index of the `{` that opens the next element after a malformed one, or -1."""
    i = buf.find("}", start)
    while i >= 0:
        j = i + 1
        while j < len(buf) and buf[j] in " \t\r\n":
            j += 1
        if j < len(buf) and buf[j] == ",":
            j += 1
            while j < len(buf) and buf[j] in " \t\r\n":
                j += 1
            if j < len(buf) and buf[j] == "{":
                return j
        i = buf.find("}", i + 1)
    return -1


def has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def text_records(path: Path, bad: BadRecords, unit: str, max_bytes: int) -> Iterator[dict]:
    if unit not in ("line", "block"):
        raise UserError(f"data.text_unit={unit!r}: expected 'line' or 'block'")
    block: list[str] = []
    start = 0
    for n, line in iter_lines(path, bad, max_bytes):
        if unit == "line":
            if line.strip():
                yield {"text": line, "source": "text", "where": f"{path}:{n}", "meta": {}}
            continue
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield {"text": "\n".join(block), "source": "text", "where": f"{path}:{start}", "meta": {}}
            block = []
    if block:
        yield {"text": "\n".join(block), "source": "text", "where": f"{path}:{start}", "meta": {}}


def parquet_records(path: Path, bad: BadRecords, text_field: str) -> Iterator[dict]:
    """Rows of the text column, batch by batch. A file pyarrow cannot open or decode (damaged,
    not parquet) is one bad record; a file without the column is a UserError (a config error)."""
    import pyarrow.parquet as pq  # lazy: ~0.4 s to import, in every data worker; only parquet inputs need it

    if path.suffix in (".gz", ".zst", ".zstd"):  # matched in directories, but pyarrow needs a seekable file
        bad.add(f"{path}:0", f"unreadable parquet: a {path.suffix} file; decompress it first "
                             f"(parquet compresses its columns itself)")
        return
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        bad.add(f"{path}:0", f"unreadable parquet: {e}")
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path}: no column '{text_field}'; columns: {', '.join(names)}; "
                        f"choose one with --set data.text_field=NAME")
    if pf.metadata.num_rows == 0:
        bad.add(f"{path}:0", "empty file")
    start = 0  # row number before the row group
    for g in range(pf.metadata.num_row_groups):
        row = start
        try:
            for batch in pf.iter_batches(columns=[text_field], batch_size=4096, row_groups=[g]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if not isinstance(value, str):
                        bad.add(f"{path}:{row}", f"missing field '{text_field}'" if value is None
                                else f"field '{text_field}' is {type(value).__name__}, not text")
                        continue
                    yield {"text": value, "source": "parquet", "where": f"{path}:{row}", "meta": {}}
        except Exception as e:  # a damaged row group: one bad record, and on to the next group
            bad.add(f"{path}:{row + 1}", f"unreadable parquet: row group {g}: {e}")
        start += pf.metadata.row_group(g).num_rows
