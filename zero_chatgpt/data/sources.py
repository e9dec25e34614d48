"""The one reader layer: every corpus and chat source, streamed record by record.

`parse_source("FORMAT:PATH")` names a source; `iter_records(source, bad)` streams its
records in one of three shapes (see FORMATS):

    text        {"text", "source", "where", "meta"}
    chat        {"messages": [{"role", "content"}, ...], "source", "where", "meta"}
    preference  {"prompt", "chosen", "rejected", "source", "where", "meta"}

Nothing is loaded whole: JSON lines are read line by line, a JSON array (wikipedia-cn)
element by element from a sliding buffer, both with a cap of data.max_record_bytes UTF-8
bytes on one record; parquet batch by batch. `.gz` / `.zst` files are decompressed on
the fly (io.open_binary). A record that cannot be used (malformed JSON, invalid UTF-8 or
a lone surrogate, a missing field, an over-long record) never stops the stream, and
neither does a file that cannot be (empty, truncated, not what its name says): each is
counted once in `BadRecords` with its `file:line` and a reason, so the data stage can
report it and keep its accounting exact. A non-empty input therefore always gives at
least one record or one bad record. Only a configuration error raises (UserError: a
parquet file without the data.text_field column, an unknown data.text_unit).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator

from zero_chatgpt.console import UserError
from zero_chatgpt.io import DECOMPRESSION_ERRORS, open_binary

# FORMAT → (record shape, what it reads). The order is the order of the help text.
FORMATS = {
    "text": ("text", "plain text: one document per line, or per blank-line-separated block"),
    "jsonl": ("text", "JSON lines with a text field (data.text_field, default 'text')"),
    "parquet": ("text", "parquet files with a text column (data.text_field)"),
    "wikipedia-cn": ("text", "one JSON array of {completion, source} (wikipedia-cn-20230720-filtered.json)"),
    "baidubaike": ("text", "JSON lines {title, summary, sections: [{title, content}], url} (563w_baidubaike)"),
    "skypile": ("text", "a directory of *.jsonl files with {text} (SkyPile-150B)"),
    "firefly": ("chat", "ShareGPT {conversations: [{from, value}]} or original {kind, input, target}"),
    "ruozhiba": ("chat", "ShareGPT {conversations: [{from, value}]} (ruozhiba QA)"),
    "sharegpt": ("chat", "ShareGPT {conversations: [{from, value}]}, optional {system}"),
    "prompt-answer": ("chat", "JSON lines {prompt, answer} (optional system)"),
    "messages": ("chat", "JSON lines {messages: [{role, content}]}"),
    "preference": ("preference", "JSON lines {prompt, chosen, rejected}"),
}
# Which files of a directory each format reads (compressed variants included).
_SUFFIXES = {"text": (".txt", ".text"), "parquet": (".parquet",), "wikipedia-cn": (".json",)}
_DEFAULT_SUFFIXES = (".jsonl", ".json")
_COMPRESSED = ("", ".gz", ".zst", ".zstd")

_CHUNK = 1 << 20  # bytes read at a time by the JSON-array reader
MAX_RECORD_BYTES = 16 << 20  # default cap on one line / one JSON element (data.max_record_bytes)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Source:
    fmt: str
    path: Path

    @property
    def kind(self) -> str:
        return FORMATS[self.fmt][0]

    def __str__(self) -> str:
        return f"{self.fmt}:{self.path}"


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


def parse_source(spec: str) -> Source:
    """`FORMAT:PATH` → Source. Unknown format or missing path: a UserError saying what is valid."""
    fmt, sep, path = str(spec).partition(":")
    if not sep or fmt not in FORMATS:
        raise UserError(f"--source {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}")
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise UserError(f"--source {spec!r}: path '{path}' does not exist")
    return Source(fmt, p)


def source_files(source: Source) -> list[Path]:
    """The files a source reads: the path itself, or the matching files under a directory, sorted."""
    if source.path.is_file():
        return [source.path]
    wanted = tuple(s + c for s in _SUFFIXES.get(source.fmt, _DEFAULT_SUFFIXES) for c in _COMPRESSED)
    return sorted(p for p in source.path.rglob("*") if p.is_file() and p.name.endswith(wanted))


def iter_records(source: Source, bad: BadRecords, *, text_field: str = "text", text_unit: str = "line",
                 max_record_bytes: int = MAX_RECORD_BYTES) -> Iterator[dict]:
    """Stream the records of `source`; unusable ones go to `bad` (never raised, never silent).

    text_field: the JSON / parquet field holding the text (jsonl, skypile, parquet).
    text_unit: "line" (one document per line) or "block" (blank-line-separated) for FORMAT text.
    """
    files = source_files(source)
    if not files:
        bad.add(str(source.path), f"no input files: nothing matching {source.fmt} under this directory")
    for path in files:
        if source.fmt == "text":
            yield from _text_records(path, bad, text_unit, max_record_bytes)
        elif source.fmt == "parquet":
            yield from _parquet_records(path, bad, text_field)
        else:
            yield from _json_records(source.fmt, path, bad, text_field, max_record_bytes)


def _json_records(fmt: str, path: Path, bad: BadRecords, text_field: str, max_bytes: int) -> Iterator[dict]:
    """Records of one JSON file (an array for wikipedia-cn, else JSON lines), each object converted."""
    objects = _json_array(path, bad, max_bytes) if fmt == "wikipedia-cn" else _json_lines(path, bad, max_bytes)
    convert = _CONVERTERS[fmt]
    for where, obj in objects:
        try:
            rec = convert(obj, text_field)
        except _Bad as e:
            bad.add(where, str(e))
            continue
        if _unencodable(rec):  # e.g. a lone surrogate escape "\ud83d": not valid Unicode text
            bad.add(where, "invalid Unicode: a lone surrogate (\\udXXX escape)")
            continue
        rec["source"], rec["where"] = fmt, where
        yield rec


# ── low-level readers: lines with a cap, JSON lines, JSON arrays, parquet ─────────────────────────

def _iter_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[int, str]]:
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


def _json_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
    for n, line in _iter_lines(path, bad, max_bytes):
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


def _json_array(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
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
    yield from _json_lines(path, bad, max_bytes)


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
            if any(isinstance(v, str) and _has_surrogates(v) for v in obj.values()):
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


def _unencodable(rec: dict) -> bool:
    """True if a string of the record, text or meta, cannot be written as UTF-8 (lone surrogates).

    meta counts too: the data stage writes it to the shards with the text, and one lone
    surrogate anywhere would make that write fail.
    """
    if "text" in rec:
        texts = [rec["text"]]
    elif "messages" in rec:
        texts = [m["content"] for m in rec["messages"]]
    else:
        texts = [rec[k] for k in ("prompt", "chosen", "rejected")]
    return any(map(_has_surrogates, texts)) or _any_surrogates(rec.get("meta"))


def _any_surrogates(value) -> bool:
    """Whether any string in a JSON value (keys included) has a lone surrogate; no recursion, as
    json nests deeper than Python's recursion limit allows a recursive walk from here."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _has_surrogates(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


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


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _text_records(path: Path, bad: BadRecords, unit: str, max_bytes: int) -> Iterator[dict]:
    if unit not in ("line", "block"):
        raise UserError(f"data.text_unit={unit!r}: expected 'line' or 'block'")
    block: list[str] = []
    start = 0
    for n, line in _iter_lines(path, bad, max_bytes):
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


def _parquet_records(path: Path, bad: BadRecords, text_field: str) -> Iterator[dict]:
    """Rows of the text column, batch by batch. A file pyarrow cannot open or decode (damaged,
    not parquet) is one bad record; a file without the column is a UserError (a config error)."""
    import pyarrow.parquet as pq

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


# ── record converters (JSON object → record); raise _Bad for an unusable record ─────────────────

class _Bad(Exception):
    pass


def _str_field(obj: dict, key: str, required: bool = True) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise _Bad(f"missing field '{key}'")
        return ""
    if not isinstance(v, str):
        raise _Bad(f"field '{key}' is {type(v).__name__}, not a string")
    return v


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _short(s: str) -> str:
    """A name from the input, for a message: clipped, control characters and lone surrogates escaped
    (a reason ends up in stats.json, which a lone surrogate could not be written to)."""
    s = json.dumps(_clip(s), ensure_ascii=False)[1:-1]
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _text_field(obj: dict, name: str) -> str:
    """The configurable text field (data.text_field) of a jsonl / skypile record.

    If it is missing, say which fields the record has and how to choose one. The reason
    starts with "missing field 'NAME'" and has no colon before that, as BadRecords groups
    reasons by their text before the first colon.
    """
    if name not in obj:
        names = [_short(k) for k in islice(obj, 8)]
        has = (", ".join(names) + (f", … ({len(obj)} fields)" if len(obj) > 8 else "")) if obj else "no fields"
        raise _Bad(f"missing field '{_short(name)}': this record has {has}; "
                   f"choose the text field with --set data.text_field=NAME")
    if obj[name] is None:
        raise _Bad(f"field '{_short(name)}' is null, not a string")
    return _str_field(obj, name)


def _jsonl(obj: dict, text_field: str) -> dict:
    meta = {k: v for k, v in obj.items() if k != text_field and isinstance(v, (str, int, float, bool))}
    return {"text": _text_field(obj, text_field), "meta": meta}


def _wikipedia(obj: dict, _field: str) -> dict:
    origin = obj.get("source")
    return {"text": _str_field(obj, "completion"), "meta": {"origin": origin} if origin else {}}


_FINAL_PUNCT = tuple("。！？!?.…；;”」』")


def _sentence(s: str) -> str:
    s = s.strip()
    return s if not s or s.endswith(_FINAL_PUNCT) else s + "。"


def _baidubaike(obj: dict, _field: str) -> dict:
    """Text as the seed composed it: `title，summary` then `section_title，content` per section,
    each part ending in punctuation (。 added where missing). Parts are separated by newlines."""
    title = _str_field(obj, "title").strip()
    summary = _str_field(obj, "summary", required=False).strip()
    sections = obj.get("sections") or []
    if not isinstance(sections, list):
        raise _Bad(f"field 'sections' is {type(sections).__name__}, not a list")
    parts = [_sentence(f"{title}，{summary}" if summary else title)]
    titles = []
    for sec in sections:
        if not isinstance(sec, dict):
            raise _Bad("a section is not an object with title and content")
        st = _str_field(sec, "title", required=False).strip()
        content = _str_field(sec, "content", required=False).strip()
        titles.append(st)
        if content:
            parts.append(_sentence(f"{st}，{content}" if st else content))
    return {"text": "\n".join(p for p in parts if p),
            "meta": {"title": title, "section_titles": titles, "url": obj.get("url") or ""}}


def _sharegpt(obj: dict, _field: str) -> dict:
    conv = obj.get("conversations")
    if conv is None:
        conv = obj.get("conversation")
    if not isinstance(conv, list) or not conv:
        raise _Bad("missing field 'conversations' (a non-empty list)")
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"]})
    for turn in conv:
        if not isinstance(turn, dict):
            raise _Bad("a turn is not an object {from, value}")
        who = turn.get("from", turn.get("role"))
        role = _SHAREGPT_ROLES.get(str(who).lower())
        if role is None:
            raise _Bad(f"unknown speaker {_clip(repr(who))} (expected human/gpt/system)")  # repr: escaped
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise _Bad("a turn has no text 'value'")
        messages.append({"role": role, "content": content})
    return {"messages": messages, "meta": {k: obj[k] for k in ("id", "category") if k in obj}}


def _firefly(obj: dict, field_: str) -> dict:
    if "conversations" in obj or "conversation" in obj:
        return _sharegpt(obj, field_)
    # the original firefly-train-1.1M: {"kind", "input", "target"}
    return {"messages": [{"role": "user", "content": _str_field(obj, "input")},
                         {"role": "assistant", "content": _str_field(obj, "target")}],
            "meta": {"kind": obj.get("kind", "")}}


def _prompt_answer(obj: dict, _field: str) -> dict:
    messages = []
    if isinstance(obj.get("system"), str) and obj["system"].strip():
        messages.append({"role": "system", "content": obj["system"]})
    messages += [{"role": "user", "content": _str_field(obj, "prompt")},
                 {"role": "assistant", "content": _str_field(obj, "answer")}]
    return {"messages": messages, "meta": {}}


def _messages(obj: dict, _field: str) -> dict:
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("missing field 'messages' (a non-empty list)")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise _Bad(f"a message is not {{role: {'|'.join(_ROLES)}, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return {"messages": out, "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {}}


def _preference(obj: dict, _field: str) -> dict:
    return {"prompt": _str_field(obj, "prompt"), "chosen": _str_field(obj, "chosen"),
            "rejected": _str_field(obj, "rejected"), "meta": {}}


_CONVERTERS = {
    "jsonl": _jsonl, "skypile": _jsonl, "wikipedia-cn": _wikipedia, "baidubaike": _baidubaike,
    "firefly": _firefly, "ruozhiba": _sharegpt, "sharegpt": _sharegpt,
    "prompt-answer": _prompt_answer, "messages": _messages, "preference": _preference,
}
