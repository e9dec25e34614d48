"""Built-in instruction data: answers from the dictionary, splits by idiom, nothing of eval leaks."""
import json

import pytest

from zero_chatgpt.data import chat_data
from zero_chatgpt.data.builtin import load_idioms


@pytest.fixture(scope="module")
def idioms():
    return load_idioms()


@pytest.fixture(scope="module")
def built(idioms):
    # A third of the dictionary keeps the test quick and still holds eval idioms cited by others.
    return chat_data.build_builtin(idioms[:10000], seed=7)


def _texts(rec):
    return [m["content"] for m in rec["messages"]] + [rec.get("reference", "")]


def test_no_eval_idiom_appears_in_sft_or_rl(built):
    ev = {r["meta"]["idiom"] for r in built.splits["eval"]}
    assert len(ev) > 300
    words = {w for w in ev}
    # An independent check (plain substring search over every text), not the builder's own index.
    by_len = {}
    for w in words:
        by_len.setdefault(len(w), set()).add(w)
    for split in ("train", "val", "rl"):
        assert built.splits[split]
        for rec in built.splits[split]:
            assert rec["meta"].get("idiom") not in ev
            for t in _texts(rec):
                for n, ws in by_len.items():
                    for i in range(len(t) - n + 1):
                        assert t[i:i + n] not in ws, (split, rec)
    assert built.dropped["mentions an eval idiom"] > 0      # the filter had something to do


def test_split_fractions_and_disjoint_idioms(built):
    per_split = {s: {r["meta"]["idiom"] for r in recs if "idiom" in r["meta"]} for s, recs in built.splits.items()}
    for a in per_split:
        for b in per_split:
            if a < b:
                assert not per_split[a] & per_split[b], (a, b)
    n = 10000
    assert 0.04 < len(per_split["eval"]) / n < 0.06
    assert 0.13 < len(per_split["rl"]) / n < 0.17
    # RM and RL parts of the pool split by idiom, never sharing one.
    parts = {}
    for r in built.splits["rl"]:
        parts.setdefault(r["meta"]["rl_part"], set()).add(r["meta"]["idiom"])
    assert set(parts) == {"rm", "rl"} and not parts["rm"] & parts["rl"]


def test_split_is_stable_under_reordering(idioms):
    sub = idioms[:3000]
    a = chat_data.build_builtin(sub, seed=3)
    b = chat_data.build_builtin(list(reversed(sub)), seed=3)
    ev = lambda d: {r["meta"]["idiom"] for r in d.splits["eval"]}
    assert ev(a) == ev(b) and ev(a)


def test_answers_come_from_the_dictionary(idioms):
    by_word = {d["word"]: d for d in idioms}
    d = by_word["一见倾心"]
    ans = chat_data.idiom_answers(d)
    assert ans["meaning"] == d["explanation"]
    assert "～" not in ans["example"] and "一见倾心" in ans["example"]
    assert "冰心" not in ans["example"]                 # the trailing （冰心《…》） attribution is not the sentence
    assert ans["pinyin"] == "yī jiàn qīng xīn"
    assert ans["origin"].startswith("出自《资治通鉴") and ans["origin"].count("”") <= ans["origin"].count("“")
    # "无" means missing: no question of that kind.
    none = next(x for x in idioms if x["derivation"] == "无" and x["example"] == "无")
    assert set(chat_data.idiom_answers(none)) == {"meaning", "pinyin"}


def test_chaining_answers_are_valid_idioms(built, idioms):
    words = {d["word"] for d in idioms}
    n = 0
    for split in ("train", "rl", "eval"):
        for r in built.splits[split]:
            if r["meta"]["kind"] == "chain":
                q = r["meta"]["idiom"]
                a = r.get("reference") or r["messages"][-1]["content"]
                assert a in words and a[0] == q[-1] and a != q
                n += 1
    assert n > 1000


def test_phrasings_vary_and_dialogues_exist(built):
    meaning_q = {r["messages"][0]["content"].replace(r["meta"]["idiom"], "X")
                 for r in built.splits["train"] if r["meta"]["kind"] == "meaning"}
    assert len(meaning_q) >= 5
    kinds = {r["meta"]["kind"] for r in built.splits["train"]}
    assert {"meaning", "origin", "example", "pinyin", "chain", "identity", "multi-turn"} <= kinds
    multi = [r for r in built.splits["train"] if r["meta"]["kind"] == "multi-turn"]
    assert all([m["role"] for m in r["messages"] if m["role"] != "system"][:4] == ["user", "assistant"] * 2
               for r in multi)
    ident = [r for r in built.splits["train"] if r["meta"]["kind"] == "identity"]
    assert any("Zero-ChatGPT" in r["messages"][-1]["content"] for r in ident)
    # answers restate the idiom; eval references are the bare dictionary field
    m = next(r for r in built.splits["train"] if r["meta"]["kind"] == "meaning")
    assert m["messages"][-1]["content"].startswith(f"“{m['meta']['idiom']}”的意思是：")
    e = next(r for r in built.splits["eval"] if r["meta"]["kind"] == "meaning")
    assert not e["reference"].startswith("“")
    # eval/rl hold prompts ending with a user turn plus a reference
    for r in built.splits["eval"][:100] + built.splits["rl"][:100]:
        assert r["messages"][-1]["role"] == "user" and r["reference"]


def test_written_to_disk(tmp_path, idioms):
    data = chat_data.build_builtin(idioms[:2000], seed=1)
    stats = chat_data.write_splits(data, tmp_path)
    for split in ("train", "val", "eval", "rl"):
        recs = chat_data.read_split(tmp_path, split)
        assert len(recs) == stats["records"][split] == len(data.splits[split])
    assert json.loads((tmp_path / "stats.json").read_text())["records"]["train"] > 0


def test_sources_are_cleaned_deduplicated_and_split(tmp_path):
    ff = tmp_path / "firefly.jsonl"
    lines = []
    for i in range(300):
        q = f"请写一句关于第{i}号城市的介绍，包括它的历史、人口和风景。"
        lines.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"第{i}号城市历史悠久。"}]})
    lines.append(dict(lines[5]))                                   # an exact duplicate
    near = json.loads(json.dumps(lines[7]))
    near["conversations"][0]["value"] += "谢谢"                     # a near duplicate
    lines.append(near)
    lines.append({"kind": "x", "input": "嗯", "target": "太短的问题"})   # question too short
    lines.append({"conversations": [{"from": "human", "value": "只有问题没有回答"}]})
    text = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n{not json\n"
    ff.write_text(text, encoding="utf-8")
    data = chat_data.build_from_sources([f"firefly:{ff}"], seed=1, min_prompt_chars=2, dedup_threshold=0.7)
    d = data.dropped
    assert d["exact duplicate"] == 1 and d["near duplicate (MinHash)"] >= 1
    assert d["question shorter than 2 chars"] == 1 and d["no user→assistant turn"] == 1
    assert sum(v for k, v in d.items() if k.startswith("unreadable")) == 1
    assert any("firefly.jsonl:" in b["where"] for b in data.bad_samples)
    n = {k: len(v) for k, v in data.splits.items()}
    assert sum(n.values()) == 300 - (d["near duplicate (MinHash)"] - 1) and n["eval"] and n["rl"] and n["train"]
    assert all(r["messages"][-1]["role"] == "user" and r["reference"] for r in data.splits["eval"])
    assert all(r["messages"][-1]["role"] == "assistant" for r in data.splits["train"])
    with pytest.raises(Exception, match="conversations"):
        pf = tmp_path / "p.jsonl"
        pf.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
        chat_data.build_from_sources([f"preference:{pf}"])
