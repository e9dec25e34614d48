"""Property-based tests of the reader layer and of the data stage's accounting, on random input.

Every FORMAT reads random bytes, random JSON values (as JSON lines and as one array) and
random Unicode text (lone surrogates, NUL, CR, U+2028 ...), plain, .gz or .zst: whole, cut
at a random byte, with a byte flipped, or plain bytes under a .gz / .zst name. Properties:

* iter_records never raises (a UserError only for a documented config error: a parquet
  file without the data.text_field column);
* every record has the documented shape (sources.py) plus "source" and "where", and can be
  written as UTF-8 JSON, meta included (the data stage writes it so);
* nothing vanishes silently: a file gives at least one record or bad record, and a whole
  line-based file exactly one per non-blank line (a JSON array: one per element).

Then the data stage, run in this process (data.workers=1), keeps
docs_in == docs_out + sum(dropped) + bad_records on the same kinds of input.

ZC_PROPERTY_SCALE=20 multiplies the number of examples, for a deeper search than the
default run (which stays well under a minute on two cores).
"""
import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zero_chatgpt.core import config
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.rundir import Context, RunDir
from zero_chatgpt.data import streams
from zero_chatgpt.data.sources import FORMATS, Source, iter_records
from zero_chatgpt.data.streams import BadRecords, has_surrogates
from zero_chatgpt.stages.data import run_stage

SUFFIX = {"text": ".txt", "parquet": ".parquet", "wikipedia-cn": ".json"}  # the others: .jsonl
STAGE_FORMATS = [f for f, (kind, _) in FORMATS.items() if kind == "text"]
ROLES = ("system", "user", "assistant")
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALE = float(os.environ.get("ZC_PROPERTY_SCALE", "1"))  # e.g. 20 for a deeper search than the default run


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


# ── random input ────────────────────────────────────────────────────────────────────────────────

# characters that have tripped readers: lone surrogates, NUL, CR, line and paragraph separators,
# a BOM, Unicode whitespace that str.strip() removes but bytes.strip() does not, JSON syntax
ODD = ["\ud800", "\udfff", "\udc80", "\x00", "\r", "\n", "\t", " ", "\u2028", "\u2029", "\ufeff", "\x1c", "\x85",
       "\u3000", '"', "\\", "{", "}", "[", "]", ",", ":", "中", "文", "。"]
chars = st.characters() | st.sampled_from(ODD)
texts = st.text(chars, max_size=24)
# the field names and speaker names the formats look for, so that converters get past their first check
FIELDS = ["text", "completion", "source", "title", "summary", "sections", "content", "url", "conversations",
          "conversation", "from", "value", "role", "system", "messages", "prompt", "answer", "chosen",
          "rejected", "input", "target", "kind", "meta", "id"]
SPEAKERS = ["human", "gpt", "user", "assistant", "system", "bot", "alien"]
keys = st.sampled_from(FIELDS) | texts
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts | st.sampled_from(SPEAKERS + list(ROLES)))
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5),
                           max_leaves=12)
json_docs = st.dictionaries(keys, json_values, max_size=6) | json_values  # mostly objects


def encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8 (ED A0 80)


@st.composite
def contents(draw):
    """(family, file bytes, number of JSON array elements or None)."""
    family = draw(st.sampled_from(["bytes", "lines", "array", "text"]))
    if family == "bytes":
        return family, draw(st.binary(max_size=300)), None
    if family == "text":
        eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
        return family, encode(eol.join(draw(st.lists(texts, max_size=8)))), None
    ascii_only = draw(st.booleans())  # \ud800 escapes, or raw (invalid UTF-8) surrogates
    values = draw(st.lists(json_docs, max_size=6))
    if family == "lines":
        eol = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
        return family, encode(eol.join(json.dumps(v, ensure_ascii=ascii_only) for v in values)), None
    indent = draw(st.sampled_from([None, 0, 2]))
    return family, encode(json.dumps(values, ensure_ascii=ascii_only, indent=indent)), len(values)


@st.composite
def stored(draw, content):
    """(file suffix, bytes on disk, how): `content` plain, .gz or .zst; "whole", "cut" at a random
    byte, with a random byte "flipped", or "mislabeled" (plain bytes under a .gz / .zst name)."""
    comp = draw(st.sampled_from(["", ".gz", ".zst"]))
    how = draw(st.sampled_from(["whole", "cut", "flipped", "mislabeled"] if comp else ["whole", "cut"]))
    if how == "mislabeled":
        return comp, content, how
    blob = (gzip.compress(content) if comp == ".gz" else
            zstandard.ZstdCompressor(write_checksum=draw(st.booleans())).compress(content) if comp else content)
    if how == "cut" and blob:
        return comp, blob[: draw(st.integers(0, len(blob) - 1))], how
    if how == "flipped":
        i = draw(st.integers(0, len(blob) - 1))
        return comp, blob[:i] + bytes([blob[i] ^ draw(st.integers(1, 255))]) + blob[i + 1:], how
    return comp, blob, "whole"


def content_lines(data: bytes) -> int:
    """How many lines of `data` the line readers must account for: the non-blank ones (undecodable
    lines are not blank), or one ("empty file") if there are none."""
    n = 0
    for raw in data.split(b"\n"):
        try:
            n += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            n += 1
    return max(1, n)


# ── checks ──────────────────────────────────────────────────────────────────────────────────────

def check_shape(fmt: str, path: Path, rec: dict) -> None:
    assert rec["source"] == fmt and rec["where"].startswith(f"{path}:")
    kind = FORMATS[fmt][0]
    if kind == "text":
        assert isinstance(rec["text"], str) and not has_surrogates(rec["text"])
    elif kind == "chat":
        msgs = rec["messages"]
        assert isinstance(msgs, list) and msgs
        for m in msgs:
            assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
    else:
        assert all(isinstance(rec[k], str) for k in ("prompt", "chosen", "rejected"))
    json.dumps(rec, ensure_ascii=False).encode("utf-8")  # writable as it is, meta included


def read_all(fmt: str, path: Path, **kw) -> tuple[list[dict], BadRecords]:
    bad = BadRecords()
    recs = list(iter_records(Source(fmt, path), bad, **kw))
    for r in recs:
        check_shape(fmt, path, r)
    assert bad.count == sum(bad.by_reason.values())
    return recs, bad


def expected_count(fmt: str, data: bytes, elements: int | None, text_unit: str) -> int | None:
    """Records + bad records a whole (uncut) file must give, where that is known exactly."""
    if fmt == "parquet" or (fmt == "text" and text_unit == "block"):
        return None
    if fmt == "wikipedia-cn" and data.lstrip().startswith(b"["):
        return max(1, elements) if elements is not None else None  # json.dumps' arrays are well formed
    return content_lines(data)


# ── every reader on random input ────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("fmt", list(FORMATS))
@settings(max_examples=examples(45), **SETTINGS)
@given(data=st.data())
def test_readers_never_raise_and_lose_nothing(fmt, data):
    family, content, elements = data.draw(contents())
    comp, blob, how = data.draw(stored(content))
    text_unit = data.draw(st.sampled_from(["line", "block"])) if fmt == "text" else "line"
    chunk = data.draw(st.sampled_from([1 << 20, 7, 64])) if fmt == "wikipedia-cn" else 1 << 20
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("in" + SUFFIX.get(fmt, ".jsonl") + comp)
        path.write_bytes(blob)
        old, streams._CHUNK = streams._CHUNK, chunk
        try:
            recs, bad = read_all(fmt, path, text_unit=text_unit)
        finally:
            streams._CHUNK = old
    assert len(recs) + bad.count >= 1, "a file gave neither a record nor a bad record"
    if how == "mislabeled":  # one "unreadable" (or one "empty file" for no bytes at all)
        assert recs == [] and bad.count == 1, bad.samples
    want = expected_count(fmt, content, elements, text_unit) if how == "whole" else None
    if want is not None:
        assert len(recs) + bad.count == want, (family, comp, bad.samples)


@settings(max_examples=examples(40), **SETTINGS)
@given(rows=st.lists(st.none() | st.text(st.characters(exclude_categories=["Cs"]), max_size=20), max_size=30),
       column=st.sampled_from(["text", "text", "body"]), cut=st.none() | st.floats(0, 1, exclude_max=True))
def test_parquet_reader_on_random_tables_whole_or_cut(rows, column, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.parquet"
        pq.write_table(pa.table({column: pa.array(rows, pa.string()), "n": list(range(len(rows)))}), path,
                       row_group_size=7)
        if cut is not None:
            raw = path.read_bytes()
            path.write_bytes(raw[: int(cut * len(raw))])
        try:
            recs, bad = read_all("parquet", path)
        except UserError as e:  # the documented config error, only for a readable file without the column
            assert cut is None and column != "text" and "--set data.text_field=NAME" in str(e)
            return
    assert len(recs) + bad.count >= 1
    if cut is None:
        assert [r["text"] for r in recs] == [r for r in rows if r is not None]
        assert bad.count == (rows.count(None) if rows else 1)


# ── the data stage keeps its accounting on random input ─────────────────────────────────────────

# documents the cleaner can keep: long enough, Chinese, often alike: one of a few long bodies and
# an ending (the same ending: an exact duplicate; another: a near duplicate), or phrases at random
PHRASES = ["长江是亚洲第一长河", "发源于青藏高原", "流经十一个省区", "最后注入东海", "黄河是中国第二长河",
           "古人称之为四渎之宗", "数学是研究数量和结构的学科", "它的历史非常悠久", "今天天气很好", "我们去公园散步"]
BODIES = ["，".join(PHRASES[i:] + PHRASES[:i]) for i in (0, 3, 6)]
documents = (st.tuples(st.sampled_from(BODIES), st.sampled_from(PHRASES)).map(lambda t: f"{t[0]}，{t[1]}。")
             | st.lists(st.sampled_from(PHRASES), min_size=1, max_size=8).map(lambda p: "，".join(p) + "。"))


@st.composite
def stage_source(draw):
    """(format, file name, bytes) of one source: random input, or documents in the format's layout."""
    fmt = draw(st.sampled_from(STAGE_FORMATS))
    name = "in" + SUFFIX.get(fmt, ".jsonl")
    if not draw(st.booleans()):
        _, content, _ = draw(contents())
        comp, blob, _ = draw(stored(content))
        return fmt, name + comp, blob
    docs = draw(st.lists(st.none() | documents, max_size=12))  # None: a record without its text
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = io.BytesIO()
        pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), out)
        return fmt, name, out.getvalue()
    if fmt == "text":
        return fmt, name, "\n".join(t or "" for t in docs).encode()
    if fmt == "wikipedia-cn":
        return fmt, name, json.dumps([{"completion": t} if t else {} for t in docs], ensure_ascii=False).encode()
    if fmt == "baidubaike":
        objs = [{"title": t[:4], "summary": t, "sections": [{"title": "历史", "content": t[::-1]}]} if t else {}
                for t in docs]
    else:
        objs = [{"text": t} if t else {"title": "no text"} for t in docs]
    return fmt, name, "\n".join(json.dumps(o, ensure_ascii=False) for o in objs).encode()


@settings(max_examples=examples(25), **SETTINGS)
@given(srcs=st.lists(stage_source(), min_size=1, max_size=3), near=st.booleans())
def test_stage_accounting_is_exact_on_random_input(srcs, near):
    with tempfile.TemporaryDirectory() as d:
        specs = []
        for i, (fmt, name, blob) in enumerate(srcs):
            path = Path(d) / f"{i}-{name}"
            path.write_bytes(blob)
            specs.append(f"{fmt}:{path}")
        run = Path(d) / "run"
        cfg = config.resolve(run, "demo", ["data.workers=1", "data.shard_docs=8", f"data.near_dedup={str(near).lower()}"])
        cfg.data.sources = specs
        try:
            stats = run_stage(Context(run_dir=RunDir(run), cfg=cfg))
        except UserError as e:  # nothing kept: stats.json is written before the error
            assert "no document was kept" in str(e)
            stats = json.loads((run / "data" / "stats.json").read_text())
            assert stats["docs_out"] == 0
    assert stats["docs_in"] == stats["docs_out"] + sum(stats["dropped"].values()) + stats["bad_records"]["count"]
    assert stats["docs_in"] >= len(srcs)  # every file gives at least one record or bad record


def test_stage_with_a_part_that_keeps_nothing(tmp_path):
    """Found by the property above: a part whose documents are all dropped saved LSH keys of shape
    (0, 0), which np.concatenate could not join to the (n, bands) keys of the other parts."""
    good = ["长江是亚洲第一长河，发源于青藏高原，流经十一个省区，最后注入东海，全长六千三百公里。",
            "数学是研究数量、结构以及空间等概念的一门学科，它的历史非常悠久，从远古时代开始发展。"]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ["短"] * 8 + good) + "\n",
                   encoding="utf-8")
    run = tmp_path / "run"
    cfg = config.resolve(run, "demo", ["data.workers=1", "data.shard_docs=8"])  # part 0: all too short
    cfg.data.sources = [f"jsonl:{src}"]
    stats = run_stage(Context(run_dir=RunDir(run), cfg=cfg))
    assert stats["docs_out"] == 2 and stats["dropped"]["too_short"] == 8
