"""The one reader layer: every corpus and chat source, streamed record by record.

`parse_source("FORMAT:PATH")` names a source; `iter_records(source, bad)` streams its
records in one of three shapes (see FORMATS):

    text        {"text", "source", "where", "meta"}
    chat        {"messages": [{"role", "content"}, ...], "source", "where", "meta"}
    preference  {"prompt", "chosen", "rejected", "source", "where", "meta"}

Nothing is loaded whole: JSON lines are read line by line with a length cap, a JSON
array (wikipedia-cn) is decoded element by element from a sliding buffer, parquet
batch by batch. `.gz` / `.zst` files are decompressed on the fly (io.open_binary).
A record that cannot be used (malformed JSON, invalid UTF-8, a missing field, an
over-long line, an empty file) never stops the stream: it is counted in `BadRecords`
with its `file:line`, so the data stage can report it and keep its accounting exact.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from zero_chatgpt.console import UserError
from zero_chatgpt.io import open_binary

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
        elif source.fmt == "wikipedia-cn":
            for where, obj in _json_array(path, bad, max_record_bytes):
                rec = _field_text(obj, "completion", where, bad)
                if rec is not None:
                    yield {"text": rec, "source": source.fmt, "where": where,
                           "meta": {"origin": obj.get("source")} if obj.get("source") else {}}
        else:
            convert = _CONVERTERS[source.fmt]
            for where, obj in _json_lines(path, bad, max_record_bytes):
                try:
                    rec = convert(obj, text_field)
                except _Bad as e:
                    bad.add(where, str(e))
                    continue
                if _unencodable(rec):  # e.g. a lone surrogate escape "\ud83d": not valid Unicode text
                    bad.add(where, "invalid Unicode: a lone surrogate (\\udXXX escape)")
                    continue
                rec["source"], rec["where"] = source.fmt, where
                yield rec


# ── low-level readers: lines with a cap, JSON lines, JSON arrays, parquet ─────────────────────────

def _iter_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, decoded line without the newline); over-long / non-UTF-8 lines go to `bad`."""
    n = 0
    try:
        with open_binary(path) as fh:
            while True:
                raw = fh.readline(max_bytes + 1)
                if not raw:
                    break
                n += 1
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    size = len(raw)
                    while raw and not raw.endswith(b"\n"):  # skip the rest without holding it
                        raw = fh.readline(1 << 20)
                        size += len(raw)
                    bad.add(f"{path}:{n}", f"line too long: {size:,} bytes > data.max_record_bytes={max_bytes:,}")
                    continue
                try:
                    yield n, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    bad.add(f"{path}:{n}", f"invalid UTF-8: {e.reason} at byte {e.start}")
    except (OSError, EOFError) as e:  # truncated .gz / .zst, unreadable file
        bad.add(f"{path}:{n + 1}", f"unreadable: {e}")
    if n == 0:
        bad.add(f"{path}:0", "empty file")


def _json_lines(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
    for n, line in _iter_lines(path, bad, max_bytes):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.add(where, f"malformed JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(obj, dict):
            bad.add(where, f"not a JSON object: {type(obj).__name__}")
            continue
        yield where, obj


def _json_array(path: Path, bad: BadRecords, max_bytes: int) -> Iterator[tuple[str, dict]]:
    """Elements of one (possibly huge) top-level JSON array, decoded from a sliding buffer.

    Text is decoded with `surrogateescape`, so invalid UTF-8 inside an element shows up as
    lone surrogates and that element alone is reported. A file that does not start with
    `[` is read as JSON lines instead.
    """
    dec = json.JSONDecoder()
    chunk = _CHUNK
    with open_binary(path) as fh:
        head = fh.read(chunk)
        while head and not head.strip() and len(head) < max_bytes:  # leading whitespace longer than a chunk
            more_head = fh.read(chunk)
            if not more_head:
                break
            head += more_head
        if not head.strip():
            bad.add(f"{path}:0", "empty file")
            return
        if not head.lstrip().startswith(b"["):
            fh.close()
            yield from _json_lines(path, bad, max_bytes)
            return
        cut = _utf8_cut(head)
        buf, pending = head[:cut].decode("utf-8", "surrogateescape"), head[cut:]
        pos = buf.index("[") + 1
        line = 1 + buf.count("\n", 0, pos)
        eof = False

        def more(size: int) -> bool:
            nonlocal buf, pos, pending, eof
            data = fh.read(size)
            if not data:
                eof = True
                return False
            data = pending + data
            cut = _utf8_cut(data)  # do not split a UTF-8 sequence between reads
            pending = data[cut:]
            buf = buf[pos:] + data[:cut].decode("utf-8", "surrogateescape")
            pos = 0
            return True

        while True:
            # skip whitespace and separators
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or not more(chunk):
                    break
            if pos >= len(buf):
                bad.add(f"{path}:{line}", "malformed JSON: the array is not closed with ]")
                return
            if buf[pos] == "]":
                return
            where = f"{path}:{line}"
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as e:
                    # cut by the end of the buffer (an error within the last few characters: a
                    # half escape, literal or delimiter), rather than malformed further back
                    truncated = e.pos >= len(buf) - 16 or e.msg.startswith("Unterminated string")
                    if truncated and not eof and len(buf) - pos <= max_bytes and more(max(chunk, len(buf) - pos)):
                        continue  # the element runs past the buffer: read on (doubling)
                    reason = (f"element too long: > data.max_record_bytes={max_bytes:,}"
                              if truncated and len(buf) - pos > max_bytes else f"malformed JSON: {e.msg}")
                    bad.add(where, reason)
                    # resynchronise at the next element boundary `},{`, keeping memory bounded
                    while True:
                        j = _next_boundary(buf, pos + 1)
                        if j >= 0:
                            line += buf.count("\n", pos, j)
                            pos = j
                            break
                        line += buf.count("\n", pos, max(pos, len(buf) - 8))
                        pos = max(pos, len(buf) - 8)
                        if not more(chunk):
                            return
                    obj = None
                    break
            if obj is None:
                continue
            line += buf.count("\n", pos, end)
            pos = end
            if len(buf) - pos < chunk // 2 and not eof:
                more(chunk)
            if not isinstance(obj, dict):
                bad.add(where, f"not a JSON object: {type(obj).__name__}")
                continue
            if any(isinstance(v, str) and _has_surrogates(v) for v in obj.values()):
                bad.add(where, "invalid UTF-8 in the element")
                continue
            yield where, obj


def _unencodable(rec: dict) -> bool:
    """True if a text field of the record cannot be written as UTF-8 (lone surrogates)."""
    if "text" in rec:
        return _has_surrogates(rec["text"])
    if "messages" in rec:
        return any(_has_surrogates(m["content"]) for m in rec["messages"])
    return any(_has_surrogates(rec[k]) for k in ("prompt", "chosen", "rejected"))


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
    import pyarrow.parquet as pq

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
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                bad.add(f"{path}:{row}", f"missing field '{text_field}'" if value is None
                        else f"field '{text_field}' is {type(value).__name__}, not text")
                continue
            yield {"text": value, "source": "parquet", "where": f"{path}:{row}", "meta": {}}


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


def _field_text(obj: dict, key: str, where: str, bad: BadRecords) -> str | None:
    try:
        return _str_field(obj, key)
    except _Bad as e:
        bad.add(where, str(e))
        return None


def _jsonl(obj: dict, text_field: str) -> dict:
    meta = {k: v for k, v in obj.items() if k != text_field and isinstance(v, (str, int, float, bool))}
    return {"text": _str_field(obj, text_field), "meta": meta}


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
            raise _Bad(f"unknown speaker {who!r} (expected human/gpt/system)")
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
    "jsonl": _jsonl, "skypile": _jsonl, "baidubaike": _baidubaike,
    "firefly": _firefly, "ruozhiba": _sharegpt, "sharegpt": _sharegpt,
    "prompt-answer": _prompt_answer, "messages": _messages, "preference": _preference,
}
