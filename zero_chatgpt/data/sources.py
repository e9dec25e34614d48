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

This module names the formats and converts JSON objects into records; the readers of lines,
JSON arrays and parquet underneath are in data/streams.py.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.data.streams import MAX_RECORD_BYTES, BadRecords, has_surrogates, json_array, json_lines, parquet_records, text_records

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
            yield from text_records(path, bad, text_unit, max_record_bytes)
        elif source.fmt == "parquet":
            yield from parquet_records(path, bad, text_field)
        else:
            yield from _json_records(source.fmt, path, bad, text_field, max_record_bytes)


def _json_records(fmt: str, path: Path, bad: BadRecords, text_field: str, max_bytes: int) -> Iterator[dict]:
    """Records of one JSON file (an array for wikipedia-cn, else JSON lines), each object converted."""
    objects = json_array(path, bad, max_bytes) if fmt == "wikipedia-cn" else json_lines(path, bad, max_bytes)
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
    return any(map(has_surrogates, texts)) or _any_surrogates(rec.get("meta"))


def _any_surrogates(value) -> bool:
    """Whether any string in a JSON value (keys included) has a lone surrogate; no recursion, as
    json nests deeper than Python's recursion limit allows a recursive walk from here."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if has_surrogates(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


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
