"""Everyday questions in unseen phrasings (eval/everyday.py): the judge, and that the phrasings are unseen."""
import random
import re
import unicodedata

import pytest

from zero_chatgpt.eval import everyday as ed
from zero_chatgpt.data import chat_data

CANNED = "我是Zero-ChatGPT，有什么可以帮你的吗？"       # the line a model that learned strings says to anything

# per category: answers in kind, and answers that are not (each a way a small model goes wrong)
GOOD = {
    "greeting": ["你好！很高兴见到你。", "哈喽，有什么想聊的？", "Hi! 我是Zero-ChatGPT。", "下午好！想了解哪个成语？",
                 "您好，有什么可以帮您？", "嗨～", "早上好呀！", "很高兴认识你！"],
    "who": [CANNED, "我叫 zero chatgpt，一个从零训练的模型。", "你好，我是Zero—ChatGPT。", "ZERO-CHATGPT为你服务。",
            "我是 Zero ChatGPT 呀"],
    "can": ["我可以解释成语的意思，还能陪你玩成语接龙。", "我擅长回答关于成语的问题。", "能帮你查成语的出处和读音。",
            "我会造句，也会解释成语。", "我可以陪你聊天。"],
    "thanks": ["不客气！", "不用谢，很高兴能帮到你。", "别客气，有问题随时问我。", "乐意效劳！", "这是我应该的。",
               "You're welcome!", "不谢不谢～"],
    "goodbye": ["再见！欢迎随时回来聊天。", "拜拜，祝你一切顺利！", "好的，下次见！", "回头见～", "晚安，做个好梦。",
                "Bye! see you.", "byebye～", "Goodbye!", "好的，有需要再来找我。"],
}
BAD = {
    "greeting": [CANNED, "再见！", "“哈喽”的意思是：打招呼的用语。", "比喻初次见面。", "hā lóu", "this is a test",
                 "一见如故", "", "谢谢"],
    "who": ["我是一个语言模型。", "我是ChatGPT。", "“自我介绍”的意思是：介绍自己。", "你好！", "", "Zero"],
    "can": [CANNED, "成语接龙：一马当先", "“功能”的意思是：事物的作用。", "不客气！", "我可以。", "你好，很高兴和你聊天。"],
    "thanks": [CANNED, "再见！", "你好！", "“感恩”的意思是：对别人的帮助表示感激。", "比喻感激不尽。", "感激涕零",
               "你好，很高兴和你聊天。", "不客气的意思是：有礼貌。"],
    "goodbye": [CANNED, "不客气！", "“再见如故”的意思是：初次见面就像老朋友一样。", "再见如故。", "“再见”出自《诗经》。",
                "zài jiàn", "你好！", "abyes"],
}
IDIOMS = {"一见如故", "感激涕零", "再见如故", "一马当先"}


@pytest.mark.parametrize("category", ed.CATEGORIES)
def test_judge_on_hand_written_answers(category):
    for a in GOOD[category]:
        assert ed.answered_in_kind(category, a, IDIOMS), (category, a)
    for a in BAD[category]:
        assert not ed.answered_in_kind(category, a, IDIOMS), (category, a)


def test_the_canned_line_is_in_kind_only_where_it_answers():
    verdicts = {c: ed.answered_in_kind(c, CANNED) for c in ed.CATEGORIES}
    assert verdicts == {"greeting": False, "who": True, "can": False, "thanks": False, "goodbye": False}
    # every SFT answer of an intent is in kind for its category: the judge agrees with the training data
    intent = {"hello": "greeting", "who": "who", "can": "can", "thanks": "thanks", "bye": "goodbye"}
    for name, _, answers in chat_data.IDENTITY:
        for a in answers:
            if name in intent:
                assert ed.answered_in_kind(intent[name], a), (name, a)
    with pytest.raises(ValueError, match="unknown everyday category"):
        ed.answered_in_kind("weather", "晴天")


def _norm(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


def _bigrams(text: str) -> set[str]:
    t = _norm(text)
    return {t[i:i + 2] for i in range(len(t) - 1)} or {t}


def _jaccard(a: str, b: str) -> float:
    x, y = _bigrams(a), _bigrams(b)
    return len(x & y) / len(x | y)


def _near(phrasing: str, turns: set[str]) -> list[str]:
    """The SFT user turns that contain the phrasing, are contained in it, or share >= 0.6 of its bigrams."""
    p = _norm(phrasing)
    return [t for t in turns if p in _norm(t) or _norm(t) in p or _jaccard(phrasing, t) >= 0.6]


@pytest.fixture(scope="module")
def sft_turns() -> set[str]:
    """Every user turn SFT trains on (built from 300 idioms: the identity dialogues are all there) and every
    template they are made from (placeholders dropped)."""
    from zero_chatgpt.data.builtin import load_idioms
    data = chat_data.build_builtin(load_idioms()[:300], seed=1)
    turns = {m["content"] for split in ("train", "val") for r in data.splits[split] for m in r["messages"]
             if m["role"] == "user"}
    turns |= {q for _, qs, _ in chat_data.IDENTITY for q in qs}
    turns |= {re.sub(r"\{\w+\}", "", t) for qs in chat_data.QUESTIONS.values() for t in qs}
    turns |= {t for qs in chat_data.FOLLOW_UPS.values() for t in qs}
    turns |= {m["content"] for r in chat_data.identity_dialogues(random.Random(0)) for m in r["messages"]
              if m["role"] == "user"}
    assert len(turns) > 300 and "谢谢" in turns and "你是谁？" in turns
    return {t for t in turns if _norm(t)}


def test_everyday_phrasings_are_not_sft_phrasings(sft_turns):
    recs = ed.everyday_records()
    assert len(recs) >= 40 and all(len(ed.EVERYDAY[c]) >= 8 for c in ed.CATEGORIES)
    assert len({_norm(r["messages"][0]["content"]) for r in recs}) == len(recs)     # no two alike
    for r in recs:
        q = r["messages"][0]["content"]
        assert not _near(q, sft_turns), (q, _near(q, sft_turns))
    # the check catches rewordings that are not new: a particle added, a question repeated
    for copy in ("你好呀", "谢谢你呀！", "你能做什么呢", "我先走了，再见。", "请介绍一下你自己"):
        assert _near(copy, sft_turns), copy


def test_judge_counts_and_paired_comparison():
    recs = ed.everyday_records()
    good = [GOOD[r["meta"]["category"]][0] for r in recs]
    res = ed.judge(recs, good)
    assert res["everyday_in_kind"] == 1.0 and res["everyday"]["n"] == len(recs) == res["everyday"]["in_kind"]
    canned = ed.judge(recs, [CANNED] * len(recs))
    by = canned["everyday"]["by_category"]
    assert by["who"] == {"k": len(ed.EVERYDAY["who"]), "n": len(ed.EVERYDAY["who"])}
    assert all(by[c]["k"] == 0 for c in ("greeting", "can", "thanks", "goodbye"))
    assert canned["everyday_in_kind"] == pytest.approx(len(ed.EVERYDAY["who"]) / len(recs))
    d = ed.compare(canned, res, 500, seed=0)["everyday_in_kind"]
    assert d["n"] == len(recs) and d["diff"] == pytest.approx(canned["everyday_in_kind"] - 1.0)
    assert d["ci95"][1] < 0                                           # a clear loss, outside noise
    assert ed.compare(res, res, 500, 0)["everyday_in_kind"]["ci95"] == [0.0, 0.0]
    assert ed.compare(res, {}, 500, 0) == {}
    rows = ed.table_rows({"sft": res, "ppo": canned, "pretrain": {}})
    assert rows[0] == ["everyday_in_kind (k/n)", f"1.000 ({len(recs)}/{len(recs)})",
                       f"{canned['everyday_in_kind']:.3f} ({by['who']['k']}/{len(recs)})", "-"]
    assert ["everyday: thanks", "9/9", "0/9", "-"] in rows
    assert ed.table_rows({"pretrain": {}}) == []
