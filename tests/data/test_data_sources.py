"""The reader layer: every FORMAT with records shaped as the seed's sources, and bad input."""
import gzip
import json
import shutil

import pytest
import zstandard

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.data.sources import FORMATS, iter_records, parse_source
from zero_chatgpt.data.streams import BadRecords

FIX = __import__("pathlib").Path(__file__).parents[1] / "fixtures" / "data"


def read(spec, **kw):
    bad = BadRecords()
    return list(iter_records(parse_source(spec), bad, **kw)), bad


def test_wikipedia_cn_json_array():
    recs, bad = read(f"wikipedia-cn:{FIX / 'wikipedia-cn.json'}")
    assert bad.count == 0 and len(recs) == 3
    assert recs[0]["text"].startswith("数学是研究数量") and recs[0]["source"] == "wikipedia-cn"
    assert recs[0]["meta"] == {"origin": "wikipedia.zh2307"}
    # where points at the line each element starts on
    assert [r["where"].rsplit(":", 1)[1] for r in recs] == ["2", "6", "10"]


def test_baidubaike_text_composed_as_the_seed_did():
    recs, bad = read(f"baidubaike:{FIX / 'baidubaike.jsonl'}")
    assert bad.count == 0 and len(recs) == 3
    assert recs[0]["text"] == ("黄河，黄河是中国第二长河，发源于青海省巴颜喀拉山脉，流经九个省区，最后注入渤海[1]。\n"
                               "水文，黄河干流全长5464公里，流域面积约75万平方公里[2-3]。黄河以泥沙含量高而闻名于世。\n"
                               "历史，黄河流域是中华文明最主要的发源地之一，古人称之为“四渎之宗”。")
    assert recs[0]["meta"]["section_titles"] == ["水文", "历史"]
    assert recs[1]["meta"]["section_titles"] == ["个人简介"]
    assert recs[2]["text"] == "短条目，内容很少。"


def test_skypile_directory_and_compressed_files(tmp_path):
    recs, bad = read(f"skypile:{FIX / 'skypile'}")
    assert bad.count == 0 and len(recs) == 3 and all(r["source"] == "skypile" for r in recs)
    # the same files as .gz and .zst read identically
    d = tmp_path / "sky"
    d.mkdir()
    files = sorted((FIX / "skypile").iterdir())
    (d / "a.jsonl.gz").write_bytes(gzip.compress(files[0].read_bytes()))
    (d / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(files[1].read_bytes()))
    recs2, bad2 = read(f"skypile:{d}")
    assert bad2.count == 0 and [r["text"] for r in recs2] == [r["text"] for r in recs]
    assert recs2[0]["where"].endswith("a.jsonl.gz:1")


def test_jsonl_text_field_and_text_blocks(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"content": "正文", "id": 7}, ensure_ascii=False) + "\n", encoding="utf-8")
    recs, bad = read(f"jsonl:{p}", text_field="content")
    assert recs[0]["text"] == "正文" and recs[0]["meta"] == {"id": 7} and bad.count == 0
    recs, bad = read(f"jsonl:{p}")
    assert recs == [] and bad.count == 1 and "missing field 'text'" in bad.samples[0]["reason"]
    recs, _ = read(f"text:{FIX / 'blocks.txt'}", text_unit="block")
    assert [r["text"] for r in recs] == ["第一段文字，讲的是春天的故事。\n它有两行。", "第二段文字，讲的是秋天的故事。"]
    assert recs[1]["where"].endswith("blocks.txt:4")
    recs, _ = read(f"text:{FIX / 'blocks.txt'}")
    assert len(recs) == 3


def test_parquet_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["第一篇", None, "第三篇"], "n": [1, 2, 3]}), p)
    recs, bad = read(f"parquet:{p}")
    assert [r["text"] for r in recs] == ["第一篇", "第三篇"]
    assert bad.count == 1 and bad.samples[0]["where"].endswith("t.parquet:2")
    with pytest.raises(UserError, match="no column 'body'.*text, n"):
        read(f"parquet:{p}", text_field="body")


@pytest.mark.parametrize("fmt,n", [("firefly", 2), ("ruozhiba", 1), ("sharegpt", 1), ("prompt-answer", 1),
                                   ("messages", 1)])
def test_chat_formats(fmt, n):
    name = {"sharegpt": "ruozhiba"}.get(fmt, fmt)
    recs, bad = read(f"{fmt}:{FIX / (name + '.jsonl')}")
    assert bad.count == 0 and len(recs) == n
    for r in recs:
        assert r["source"] == fmt and ":" in r["where"]
        roles = [m["role"] for m in r["messages"]]
        assert "user" in roles and roles[-1] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    if fmt == "firefly":  # both the ShareGPT form and the original {kind, input, target}
        assert recs[1]["messages"] == [{"role": "user", "content": "对联：春风得意马蹄疾"},
                                       {"role": "assistant", "content": "下联：秋水无痕雁影斜"}]
        assert recs[1]["meta"] == {"kind": "Couplet"}
    if fmt == "messages":
        assert recs[0]["messages"][0]["role"] == "system"


def test_preference():
    recs, bad = read(f"preference:{FIX / 'preference.jsonl'}")
    assert bad.count == 0 and recs[0]["prompt"].startswith("“画蛇添足”")
    assert set(recs[0]) >= {"prompt", "chosen", "rejected", "source", "where"}


def test_bad_input_is_counted_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "好的一行"}, ensure_ascii=False).encode(),
        b'{"text": "no closing brace"',
        b'["not", "an", "object"]',
        b'{"other": 1}',
        b'{"text": 5}',
        b'{"text": "\xff\xfe broken utf-8"}',
        b'{"text": "a lone surrogate \\ud83d escape"}',
        b"",
        json.dumps({"text": "最后一行"}, ensure_ascii=False).encode(),
    ]
    p.write_bytes(b"\n".join(lines) + b"\n")
    recs, bad = read(f"jsonl:{p}")
    assert [r["text"] for r in recs] == ["好的一行", "最后一行"]
    assert bad.count == 6
    where = [s["where"].rsplit(":", 1)[1] for s in bad.samples]
    assert where == ["2", "3", "4", "5", "6", "7"]
    reasons = " | ".join(s["reason"] for s in bad.samples)
    for part in ("malformed JSON", "not a JSON object", "missing field 'text'", "not a string", "invalid UTF-8",
                 "lone surrogate"):
        assert part in reasons
    # an empty file and a missing-field chat record
    (tmp_path / "empty.jsonl").write_bytes(b"")
    recs, bad = read(f"jsonl:{tmp_path / 'empty.jsonl'}")
    assert recs == [] and bad.count == 1 and bad.samples[0]["reason"] == "empty file"
    (tmp_path / "chat.jsonl").write_text('{"conversations": [{"from": "alien", "value": "x"}]}\n{"prompt": 1}\n')
    _, bad = read(f"sharegpt:{tmp_path / 'chat.jsonl'}")
    assert bad.count == 2 and "unknown speaker" in bad.samples[0]["reason"]


def test_a_50mb_line_is_a_bad_record_not_a_crash(tmp_path):
    p = tmp_path / "huge.jsonl"
    with open(p, "wb") as fh:
        fh.write(b'{"text": "before"}\n{"text": "')
        block = "长" * (1 << 20)
        for _ in range(17):  # 17 M characters = 51 MB of UTF-8
            fh.write(block.encode())
        fh.write(b'"}\n{"text": "after"}\n')
    recs, bad = read(f"jsonl:{p}")
    assert [r["text"] for r in recs] == ["before", "after"]
    assert bad.count == 1 and bad.samples[0]["where"].endswith("huge.jsonl:2")
    assert "line too long" in bad.samples[0]["reason"]


def test_json_array_streams_and_recovers(tmp_path):
    elems = [{"completion": f"第{i}篇。" + "文" * (i * 997 % 5000), "source": "w"} for i in range(600)]
    raw = json.dumps(elems, ensure_ascii=False).encode()  # ~4 MB on one line: many buffer refills
    # corrupt one element in the middle (a missing colon) and one with invalid UTF-8
    i = raw.index('{"completion": "第300篇'.encode())
    raw = raw[:i] + raw[i:].replace(b'"completion": ', b'"completion" ', 1)
    j = raw.index('第400篇'.encode())
    raw = raw[:j] + b"\xff" + raw[j:]
    p = tmp_path / "wiki.json.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(raw))
    recs, bad = read(f"wikipedia-cn:{p}")
    assert len(recs) == 598 and bad.count == 2
    assert {s["reason"].split(":")[0] for s in bad.samples} == {"malformed JSON", "invalid UTF-8 in the element"}
    texts = [r["text"] for r in recs]
    assert texts[299].startswith("第299篇") and texts[299 + 1].startswith("第301篇")
    # an unclosed array is reported, the elements before it kept
    (tmp_path / "cut.json").write_bytes(raw[: len(raw) // 2])
    recs, bad = read(f"wikipedia-cn:{tmp_path / 'cut.json'}")
    assert 100 < len(recs) < 598 and bad.samples[-1]["reason"].startswith("malformed JSON")
    assert all(r["text"].startswith(f"第{k if k < 300 else k + 1}篇") for k, r in enumerate(recs))


def test_unknown_format_and_missing_path_are_one_line_errors(tmp_path):
    with pytest.raises(UserError) as e:
        parse_source(f"csv:{tmp_path}")
    assert all(f in str(e.value) for f in FORMATS) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        parse_source(f"jsonl:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(UserError, match="FORMAT:PATH"):
        parse_source("just-a-path")


def test_directory_without_matching_files(tmp_path):
    shutil.copy(FIX / "blocks.txt", tmp_path / "x.txt")
    recs, bad = read(f"jsonl:{tmp_path}")
    assert recs == [] and bad.count == 1 and "no input files" in bad.samples[0]["reason"]


def test_readers_stream_without_loading_the_file(tmp_path):
    import tracemalloc

    elem = {"completion": "长江是亚洲第一长河。" * 100, "source": "w"}  # ~3 KB of UTF-8
    n = 8000                                                            # ~24 MB in all
    line = json.dumps(elem, ensure_ascii=False)
    (tmp_path / "a.json").write_text("[\n" + ",\n".join([line] * n) + "\n]\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text((json.dumps({"text": elem["completion"]}, ensure_ascii=False) + "\n") * n,
                                      encoding="utf-8")
    for spec in (f"wikipedia-cn:{tmp_path / 'a.json'}", f"jsonl:{tmp_path / 'b.jsonl'}"):
        bad = BadRecords()
        tracemalloc.start()
        count = sum(1 for _ in iter_records(parse_source(spec), bad))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == n and bad.count == 0
        assert peak < 12 << 20, f"{spec}: peak {peak / 2**20:.1f} MiB for a 24 MB file"  # ~10 MiB of buffers


def test_json_array_reader_matches_json_loads_at_any_chunk_size(tmp_path, monkeypatch):
    """Property: whatever the formatting and wherever reads split the bytes (inside a UTF-8
    character, a string, an escape), the streaming reader yields exactly json.loads' elements."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from zero_chatgpt.data import streams

    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    elem = st.fixed_dictionaries({"completion": text}, optional={"source": text, "n": st.integers()})

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(elem, max_size=12), st.sampled_from([None, 0, 2]), st.booleans(), st.integers(1, 64))
    def check(elems, indent, ascii_only, chunk):
        monkeypatch.setattr(streams, "_CHUNK", chunk)
        p = tmp_path / "a.json"
        p.write_text(json.dumps(elems, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
        bad = BadRecords()
        got = [r["text"] for r in iter_records(parse_source(f"wikipedia-cn:{p}"), bad)]
        assert bad.count == (0 if elems else 1)  # an empty array: one "empty file"
        assert got == [e["completion"] for e in elems]

    check()


# ── damaged compressed files, empty files, caps, messages ───────────────────────────────────────

def _zstd_frames():
    """Small zstd frames of every kind a file can hold, and a skippable frame."""
    def stream_frame(data):  # what a stream writer makes: no content size, a window descriptor
        out = __import__("io").BytesIO()
        with zstandard.ZstdCompressor(write_checksum=True).stream_writer(out, closefd=False) as w:
            w.write(data)
        return out.getvalue()

    return [
        zstandard.ZstdCompressor().compress(b'{"text": "one"}\n' * 20),               # single segment
        zstandard.ZstdCompressor(write_checksum=True).compress(b'{"text": "two"}\n'),  # + checksum
        (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"skip!",     # skippable
        stream_frame(b'{"text": "three"}\n' * 7),
        zstandard.ZstdCompressor().compress(b""),                                      # an empty frame
        zstandard.ZstdCompressor(write_content_size=False).compress(b'{"text": "four"}\n'),
    ]


def test_zst_cut_anywhere_inside_a_frame_is_an_error_and_between_frames_is_not(tmp_path):
    from zero_chatgpt.core.io import open_binary

    frames = _zstd_frames()
    whole = b"".join(frames)
    ends = {sum(map(len, frames[:k])) for k in range(len(frames) + 1)}  # frame boundaries, 0 included
    p = tmp_path / "f.zst"
    for cut in range(len(whole) + 1):
        p.write_bytes(whole[:cut])
        try:
            with open_binary(p) as fh:
                fh.read()
            failed = None
        except EOFError as e:
            failed = str(e)
        if cut in ends:
            assert failed is None, f"cut at {cut} (a frame boundary) read as truncated"
        else:
            assert failed and "truncated zstd frame" in failed, f"cut at {cut} of {len(whole)} read cleanly"
    p.write_bytes(whole)
    assert open_binary(p).read().count(b"\n") == 20 + 1 + 7 + 1


def test_truncated_zst_is_a_bad_record_naming_the_file(tmp_path):
    import random

    rng = random.Random(1)
    lines = [json.dumps({"text": "".join(rng.choice("春夏秋冬山水花鸟") for _ in range(200))}, ensure_ascii=False)
             for _ in range(3000)]
    data = ("\n".join(lines) + "\n").encode()
    z = zstandard.ZstdCompressor().compress(data)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(z[: len(z) * 3 // 100])  # 97 % cut off
    recs, bad = read(f"jsonl:{cut}")
    assert len(recs) < 3000 * 0.05 and bad.count >= 1
    last = bad.samples[-1]
    assert last["where"].startswith(str(cut) + ":") and "unreadable" in last["reason"]
    assert "truncated zstd frame" in last["reason"]
    # the same as one JSON array (wikipedia-cn): elements before the cut kept, the cut reported
    arr = json.dumps([{"completion": json.loads(ln)["text"]} for ln in lines], ensure_ascii=False).encode()
    za = zstandard.ZstdCompressor().compress(arr)
    (tmp_path / "cut.json.zst").write_bytes(za[: len(za) // 2])
    recs, bad = read(f"wikipedia-cn:{tmp_path / 'cut.json.zst'}")
    assert 0 < len(recs) < 3000 and any("truncated zstd frame" in s["reason"] for s in bad.samples)
    # ... and a truncated .gz array, which used to crash the array reader
    zg = gzip.compress(arr)
    (tmp_path / "cut.json.gz").write_bytes(zg[: len(zg) // 2])
    recs, bad = read(f"wikipedia-cn:{tmp_path / 'cut.json.gz'}")
    assert 0 < len(recs) < 3000 and bad.count == 1 and bad.samples[0]["reason"].startswith("unreadable")


def test_whole_zst_files_read_fully_multi_frame_and_our_own(tmp_path):
    import os

    from zero_chatgpt.core.io import JsonlZstWriter, iter_jsonl, open_binary

    docs = [{"text": f"第{i}篇：" + "长文" * (i % 300)} for i in range(4000)]   # > 1 MiB: many blocks, reads
    with JsonlZstWriter(tmp_path / "ours.jsonl.zst") as w:
        for d in docs:
            w.write(d)
    assert list(iter_jsonl(tmp_path / "ours.jsonl.zst")) == docs
    noise, runs = os.urandom(300_000), b"a" * 3_000_000                 # raw blocks, RLE blocks
    multi = tmp_path / "multi.zst"
    multi.write_bytes(b"".join(zstandard.ZstdCompressor(level=lv).compress(x)
                               for lv, x in ((1, noise), (3, runs), (19, noise))) + b"".join(_zstd_frames()))
    with open_binary(multi) as fh:
        assert fh.read(len(noise)) == noise and fh.read(len(runs)) == runs and fh.read(len(noise)) == noise
        assert fh.read().count(b"\n") == 29
    recs, bad = read(f"jsonl:{multi}")  # binary noise: bad records, but the whole file is read
    assert [r["text"] for r in recs][-4:] == ["three"] * 3 + ["four"]


def test_non_compressed_data_named_gz_or_zst_is_one_unreadable_record(tmp_path):
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        (tmp_path / name).write_bytes(b'{"text": "plain, not compressed"}\n')
        for fmt in ("jsonl", "text", "wikipedia-cn", "sharegpt"):
            recs, bad = read(f"{fmt}:{tmp_path / name}")
            assert recs == [] and bad.count == 1, (fmt, name, bad.samples)
            assert bad.samples[0]["reason"].startswith("unreadable: ") and bad.samples[0]["where"].endswith(":1")
    # a compressed empty file, an empty file and a blank one: "empty file", once each
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp_path / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b""))
    (tmp_path / "e.json").write_bytes(b"")
    (tmp_path / "blank.txt").write_bytes(b"\n  \r\n\t\n")
    (tmp_path / "arr.json").write_bytes(b" [ ]\n")
    for spec in ("jsonl:e.jsonl.gz", "text:e.jsonl.zst", "wikipedia-cn:e.json", "wikipedia-cn:e.jsonl.gz",
                 "text:blank.txt", "jsonl:blank.txt", "wikipedia-cn:arr.json"):
        fmt, name = spec.split(":")
        recs, bad = read(f"{fmt}:{tmp_path / name}")
        assert recs == [] and bad.count == 1 and bad.samples[0]["reason"].startswith("empty file"), spec


def test_json_array_element_cap_counts_utf8_bytes(tmp_path, monkeypatch):
    from zero_chatgpt.data import streams

    elems = [{"completion": "短"}, {"completion": "长" * 600}, {"completion": "后"}]   # 1,800 bytes, 600 chars
    p = tmp_path / "w.json"
    p.write_text(json.dumps(elems, ensure_ascii=False, indent=1), encoding="utf-8")
    for chunk in (1 << 20, 64):  # the element in the buffer, or running past it
        monkeypatch.setattr(streams, "_CHUNK", chunk)
        recs, bad = read(f"wikipedia-cn:{p}", max_record_bytes=1000)
        assert [r["text"] for r in recs] == ["短", "后"] and bad.count == 1, chunk
        assert bad.samples[0]["reason"].startswith("element too long") and "1,000" in bad.samples[0]["reason"]
        assert bad.samples[0]["where"].endswith("w.json:5")
        # as JSON lines the same record is rejected the same way
        q = tmp_path / "w.jsonl"
        q.write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in elems) + "\n", encoding="utf-8")
        assert [r["text"] for r in read(f"wikipedia-cn:{q}", max_record_bytes=1000)[0]] == ["短", "后"]
        recs, bad = read(f"wikipedia-cn:{p}", max_record_bytes=1900)
        assert len(recs) == 3 and bad.count == 0


def test_json_array_reader_reads_no_further_than_the_cap(tmp_path):
    import tracemalloc

    # one 31 MB element of Chinese (10 M characters, under the 16 Mi cap in characters) between two small ones
    p = tmp_path / "huge.json"
    with open(p, "wb") as fh:
        fh.write('[{"completion": "前"},\n{"completion": "'.encode())
        for _ in range(10):
            fh.write(("长" * (1 << 20)).encode())
        fh.write('"},\n{"completion": "后"}]\n'.encode())
    bad = BadRecords()
    tracemalloc.start()
    recs = list(iter_records(parse_source(f"wikipedia-cn:{p}"), bad))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [r["text"] for r in recs] == ["前", "后"] and bad.count == 1
    assert bad.samples[0]["reason"] == "element too long: > data.max_record_bytes=16,777,216 bytes"
    assert bad.samples[0]["where"].endswith(":2")
    assert peak < 48 << 20, f"peak {peak / 2**20:.1f} MiB with a 16 MiB cap"  # bounded by the cap, not the element


def test_missing_text_field_says_which_fields_there_are(tmp_path):
    p = tmp_path / "t.jsonl"
    many = {f"f{i}": i for i in range(12)}
    p.write_text(json.dumps({"title": "标题", "body": "正文"}, ensure_ascii=False) + "\n" + json.dumps(many) + "\n"
                 + "{}\n", encoding="utf-8")
    for fmt in ("jsonl", "skypile"):
        recs, bad = read(f"{fmt}:{p}")
        assert recs == [] and bad.count == 3
        r0, r1, r2 = (s["reason"] for s in bad.samples)
        assert r0 == ("missing field 'text': this record has title, body; "
                      "choose the text field with --set data.text_field=NAME")
        assert "f0, f1, f2, f3, f4, f5, f6, f7, …" in r1 and "f8" not in r1 and "12 fields" in r1
        assert "this record has no fields" in r2
        assert dict(bad.by_reason) == {"missing field 'text'": 3}
    recs, bad = read(f"jsonl:{p}", text_field="body")
    assert [r["text"] for r in recs] == ["正文"] and "missing field 'body': this record has f0" in bad.samples[0]["reason"]
    p.write_text('{"text": null, "content": "x"}\n{"text": 5}\n')
    _, bad = read(f"jsonl:{p}")
    assert [s["reason"] for s in bad.samples] == ["field 'text' is null, not a string", "field 'text' is int, not a string"]


def test_malformed_json_messages_read_well(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"text": "unterminated\n{"text": }\n{"text": "x"} extra\n{"text": "a\x01b"}\n'
                  b'{"text": "x", "n": ' + b"1" * 5000 + b"}\n" + b"[" * 5000 + b"\n")
    recs, bad = read(f"jsonl:{p}")
    reasons = [s["reason"] for s in bad.samples]
    assert reasons[:4] == ["malformed JSON: Unterminated string starting at column 10",
                           "malformed JSON: Expecting value at column 10",
                           "malformed JSON: Extra data at column 15",
                           "malformed JSON: Invalid control character at column 12"]
    assert reasons[4].startswith("malformed JSON: ") and "4300 digits" in reasons[4]   # not a crash
    assert reasons[5] == "malformed JSON: nested too deeply"
    assert all(" at at " not in r for r in reasons) and recs == []
    # the array reader says the same, with the line of the error
    q = tmp_path / "m.json"
    q.write_bytes(b'[{"completion": "ok"},\n{"completion":\n "a\x01b"},\n{"completion": "'
                  + b"1" * 10 + b'", "n": ' + b"1" * 5000 + b"},\n" + b'{"deep": ' + b"[" * 5000 + b"]" * 5000 + b"},\n"
                  + b'{"completion": "end"}, null]')
    recs, bad = read(f"wikipedia-cn:{q}")
    assert [r["text"] for r in recs] == ["ok", "end"]
    reasons = [s["reason"] for s in bad.samples]
    assert reasons[0] == "malformed JSON: Invalid control character at line 3"
    assert "4300 digits" in reasons[1] and reasons[2] == "malformed JSON: nested too deeply"
    assert reasons[3] == "not a JSON object: null" and len(reasons) == 4


def test_damaged_or_compressed_parquet_is_a_bad_record(tmp_path):
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    p = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["".join(rng.choice("春夏秋冬ab") for _ in range(50)) for _ in range(8000)]}),
                   p, row_group_size=1000, compression="none")
    raw = bytearray(p.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 2000):  # garble a row group in the middle
        raw[i] = rng.randrange(256)
    (tmp_path / "c.parquet").write_bytes(bytes(raw))
    recs, bad = read(f"parquet:{tmp_path / 'c.parquet'}")  # that group is lost, the others are read
    assert len(recs) >= 6000 and bad.count >= 1 and bad.samples[0]["reason"].startswith("unreadable parquet")
    assert recs[-1]["where"].endswith(":8000")
    (tmp_path / "p.parquet.gz").write_bytes(gzip.compress(p.read_bytes()))
    recs, bad = read(f"parquet:{tmp_path / 'p.parquet.gz'}")
    assert recs == [] and bad.count == 1 and "decompress it first" in bad.samples[0]["reason"]


def test_json_array_scalar_cut_by_a_read_is_one_element(tmp_path, monkeypatch):
    from zero_chatgpt.data import streams

    p = tmp_path / "n.json"
    p.write_text('[1.5e+3, {"completion": "x"}, -12, true, null]')
    for chunk in range(1, 12):  # wherever a read ends: `1.` | `5e+3` used to be two bad elements
        monkeypatch.setattr(streams, "_CHUNK", chunk)
        recs, bad = read(f"wikipedia-cn:{p}")
        assert [r["text"] for r in recs] == ["x"] and bad.count == 4, (chunk, bad.samples)


def test_corrupt_gz_and_zst_data_is_a_bad_record(tmp_path):
    lines = "".join(json.dumps({"text": f"第{i}行" * 30}, ensure_ascii=False) + "\n" for i in range(300)).encode()
    for name, blob in (("c.jsonl.gz", gzip.compress(lines)), ("c.jsonl.zst", zstandard.ZstdCompressor().compress(lines))):
        raw = bytearray(blob)
        raw[20] ^= 0x55  # inside the compressed structure: zlib.error / ZstdError, which used to escape
        (tmp_path / name).write_bytes(bytes(raw))
        for fmt in ("jsonl", "wikipedia-cn"):
            recs, bad = read(f"{fmt}:{tmp_path / name}")
            assert recs == [] and bad.count == 1 and bad.samples[0]["reason"].startswith("unreadable: "), (name, fmt)
