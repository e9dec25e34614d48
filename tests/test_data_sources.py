"""The reader layer: every FORMAT with records shaped as the seed's sources, and bad input."""
import gzip
import json
import shutil

import pytest
import zstandard

from zero_chatgpt.console import UserError
from zero_chatgpt.data.sources import FORMATS, BadRecords, iter_records, parse_source

FIX = __import__("pathlib").Path(__file__).parent / "fixtures" / "data"


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

    from zero_chatgpt.data import sources

    text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
    elem = st.fixed_dictionaries({"completion": text}, optional={"source": text, "n": st.integers()})

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(elem, max_size=12), st.sampled_from([None, 0, 2]), st.booleans(), st.integers(1, 64))
    def check(elems, indent, ascii_only, chunk):
        monkeypatch.setattr(sources, "_CHUNK", chunk)
        p = tmp_path / "a.json"
        p.write_text(json.dumps(elems, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
        bad = BadRecords()
        got = [r["text"] for r in iter_records(parse_source(f"wikipedia-cn:{p}"), bad)]
        assert bad.count == 0
        assert got == [e["completion"] for e in elems]

    check()
