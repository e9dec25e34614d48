"""Everyday questions in unseen phrasings: does a chat model answer "hi", "who are you", "what can you do",
"thanks" and "bye" in kind when they are not worded as in its training data?

The SFT data teaches these intents with a handful of fixed questions (chat_data.IDENTITY). A model that
learned the intent answers a rewording in kind; one that learned the strings answers it like an idiom
question, or with the one canned line it knows best ("我是Zero-ChatGPT，有什么可以帮你的吗？" to a thanks).
EVERYDAY holds 45 user turns, 9 in each of 5 categories, none of them an SFT question nor a near copy
of one (tests/eval/test_eval_everyday.py checks character-bigram Jaccard < 0.6 against every SFT user turn).

`answered_in_kind(category, answer)` is the judge: generous about wording, strict about intent —
  greeting  a greeting word (你好, 您好, 嗨, 哈喽, 早上好, hello, 很高兴见到你, ...)
  who       names the assistant (chat_data.NAME, Zero-ChatGPT, however spaced, hyphenated or cased)
  can       says what it can do (可以/能/会/擅长/帮) about idioms, explaining or answering (成语, 解释, 回答, ...)
  thanks    acknowledges thanks (不客气, 不用谢, 很高兴能帮到你, 乐意, 应该的, ...)
  goodbye   takes leave (再见, 拜拜, 下次见, 回头见, 晚安, 欢迎随时回来, ...)
and in every category, never an answer shaped as an idiom answer: "“X”的意思是：…", "“X”出自…", a bare
explanation opening with 比喻/形容, a line of tone-marked pinyin, or a bare dictionary idiom (a chaining
reply) — the failure of a model that reads every input as an idiom question (再见 → "再见如故…").

The eval stage asks them of every chat stage, greedily, and writes everyday_in_kind (the share over all
45) with `everyday` (k/n per category, each question's answer and verdict) to eval/<stage>.json; a stage
other than SFT gets a paired difference to SFT (vs_sft.everyday_in_kind, paired by question). Each
category has 9 questions, far under 30: its figure is always shown as k/n.
"""
from __future__ import annotations

import json
import re
import unicodedata

import xxhash

from zero_chatgpt.data.chat_data import NAME
from zero_chatgpt.eval.metrics import paired_bootstrap
from zero_chatgpt.eval.prompts import answer_prompts

CATEGORIES = ("greeting", "who", "can", "thanks", "goodbye")

# Worded unlike every SFT question of these intents (chat_data.IDENTITY): none contains one of them
# (no 你好/嗨/在吗, no 谢谢/多谢, no 再见/拜拜/晚安, no 你是谁/你能做什么 ...), so a model must generalize.
EVERYDAY: dict[str, tuple[str, ...]] = {
    "greeting": ("哈喽！", "下午好呀。", "中午好！", "早安～", "Hello!", "hi，打个招呼吧", "初次见面，请多关照。",
                 "见到你很高兴！", "嘿，朋友，又见面啦！"),
    "who": ("请问怎么称呼你？", "我在跟谁说话呢？", "能做个自我介绍吗？", "你有名字吗？", "屏幕那头的是哪位？",
            "说说你的身份吧。", "你是个什么AI？", "你的大名是？", "报一下你的名号吧。"),
    "can": ("你都有哪些功能？", "你擅长干啥？", "你可以帮上什么忙？", "能为我做些什么呢？", "你有啥用处？",
            "说说你的能力吧。", "你的强项是什么？", "找你的话，能聊些什么？", "你能派上什么用场？"),
    "thanks": ("感谢你的耐心解答！", "谢啦！", "太有用了，谢了。", "辛苦你了，帮了大忙。", "Thank you!",
               "thanks a lot", "万分感激！", "明白了，感恩！", "受教了，非常感谢。"),
    "goodbye": ("我要下线了。", "回头聊！", "先这样吧，改天再聊。", "Bye!", "886", "不聊了，我去忙了。",
                "我得走了，回见。", "时间不早了，我去睡了。", "告辞！"),
}
JUDGE_VERSION = 1          # raise when answered_in_kind changes: eval's results depend on it (`asked_key`)

_NOT_LATIN = r"(?<![a-z]){}(?![a-z])"            # an English word, not part of a longer one ("hi" in "this")
_WORDS = {
    "greeting": r"你好|您好|嗨|哈喽|哈啰|哈罗|早上好|早安|上午好|中午好|下午好|晚上好|早啊|见到你|认识你|欢迎(?!随时|下次|再来|回来)"
                r"|很高兴(?:和|跟|与|同)你|" + "|".join(_NOT_LATIN.format(w) for w in ("hello", "hi", "hey")),
    "can": r"成语|解释|回答|解答|问答|造句|接龙|拼音|读音|出处|典故|聊天|对话",
    "thanks": r"不客气|不用客气|别客气|不必客气|无需客气|不用谢|不必谢|不谢|(?:高兴|开心)(?:能|可以)?(?:帮|为|对你有)"
              r"|乐意|荣幸|应该的|小事一桩|you'?re welcome|no problem|my pleasure",
    "goodbye": r"再见|再会|拜拜|回见|下次见|回头见|改天见|明天见|待会见|晚安|慢走|保重|一路顺风|下次再聊|改天再聊|回头聊"
               r"|欢迎(?:随时|下次|再来|回来)|随时回来|再来找我|see you|" + _NOT_LATIN.format("(?:good ?)?(?:bye)+"),
}
_RX = {k: re.compile(v) for k, v in _WORDS.items()}
_ABLE = re.compile(r"可以|能|会|擅长|帮|陪")          # "can": the answer is about what it is able to do
# the shapes of an idiom answer (chat_data.answer_text and the dictionary's explanations)
_IDIOM_ANSWER = re.compile(r"的意思是|[”」\"](?:出自|的例句)|^出自|^(?:比喻|形容)")
_TONED = re.compile(r"[\u0304\u0301\u030c\u0300]")


def _norm(text: str) -> str:
    return unicodedata.normalize("NFKC", text or "").strip().lower()


def _name_key(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", _norm(text))


def looks_like_idiom_answer(answer: str, idioms: set[str] | None = None) -> bool:
    """The answer has the shape of an answer to an idiom question (see the module docstring)."""
    t = _norm(answer).lstrip("“”\"'「」『』 ")
    if _IDIOM_ANSWER.search(t) or len(_TONED.findall(unicodedata.normalize("NFD", t))) >= 2:
        return True
    bare = re.sub(r"[\s。！？，、“”「」《》.!?,\"']", "", answer or "")
    return idioms is not None and bare in idioms


def answered_in_kind(category: str, answer: str, idioms: set[str] | None = None, name: str = NAME) -> bool:
    """Whether `answer` answers an everyday user turn of `category` in kind (criteria: module docstring).
    idioms: the dictionary's idioms, to tell a bare idiom (a chaining reply) from an answer; optional."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown everyday category {category!r}; one of {', '.join(CATEGORIES)}")
    t = _norm(answer)
    if not t or looks_like_idiom_answer(answer, idioms):
        return False
    if category == "who":
        return _name_key(name) in _name_key(t)
    if category == "can":
        return bool(_RX["can"].search(t) and _ABLE.search(t))
    return bool(_RX[category].search(t))


def everyday_records() -> list[dict]:
    """The everyday user turns as eval records (one user message each), categories in CATEGORIES order."""
    return [{"messages": [{"role": "user", "content": q}], "meta": {"kind": "everyday", "category": c}}
            for c in CATEGORIES for q in EVERYDAY[c]]


def asked_key() -> str:
    """What an everyday result depends on besides the model: the questions and the judge's version."""
    return xxhash.xxh64_hexdigest(json.dumps([EVERYDAY, JUDGE_VERSION], ensure_ascii=False).encode())


def judge(records: list[dict], answers: list[str], idioms: set[str] | None = None) -> dict:
    """{"everyday_in_kind": share, "everyday": {n, in_kind, by_category: {c: {k, n}}, asked: [...]}}."""
    asked, by_cat = [], {c: {"k": 0, "n": 0} for c in CATEGORIES}
    for r, a in zip(records, answers):
        c = r["meta"]["category"]
        ok = answered_in_kind(c, a, idioms)
        by_cat[c]["k"] += int(ok)
        by_cat[c]["n"] += 1
        asked.append({"category": c, "question": r["messages"][-1]["content"], "answer": a, "in_kind": ok})
    k, n = sum(x["in_kind"] for x in asked), len(asked)
    return {"everyday_in_kind": float(f"{k / n:.6g}") if n else None,
            "everyday": {"n": n, "in_kind": k, "by_category": by_cat, "asked": asked}}


def ask(model, tok, e: dict, idioms: set[str] | None = None, desc: str = "everyday") -> dict:
    """A chat model's greedy answers to the everyday questions (eval's decoding: e = cfg.eval), judged."""
    recs = everyday_records()
    gens, _ = answer_prompts(model, tok, recs, chat=True, max_new_tokens=e.max_new_tokens,
                             batch_size=e.batch_size, repetition_penalty=e.repetition_penalty, desc=desc)
    return judge(recs, [g.text for g in gens], idioms)


def compare(res: dict, ref: dict | None, resamples: int, seed: int) -> dict:
    """{"everyday_in_kind": paired difference to `ref` (SFT's result)}, paired by question; {} without both."""
    mine, theirs = (res or {}).get("everyday"), (ref or {}).get("everyday")
    if not mine or not theirs:
        return {}
    ref_by_q = {(x["category"], x["question"]): x["in_kind"] for x in theirs["asked"]}
    pairs = [(int(x["in_kind"]), int(ref_by_q[(x["category"], x["question"])])) for x in mine["asked"]
             if (x["category"], x["question"]) in ref_by_q]
    d = paired_bootstrap([p[0] for p in pairs], [p[1] for p in pairs], resamples, seed)
    if d is None:
        return {}
    d["diff"] = float(f"{d['diff']:.6g}")
    if "ci95" in d:
        d["ci95"] = [float(f"{v:.6g}") for v in d["ci95"]]
    return {"everyday_in_kind": d}


def table_rows(results: dict[str, dict]) -> list[list]:
    """Rows for a stages-side-by-side table: everyday_in_kind as "share (k/n)", then each category as k/n
    (9 questions each: a bare share would hide that one answer moves it by 11 points). [] when no stage
    has the figure."""
    if not any("everyday" in r for r in results.values()):
        return []

    def cell(r: dict, c: str | None = None) -> str:
        ev = r.get("everyday")
        if not ev:
            return "-"
        if c is None:
            return f"{ev['in_kind'] / ev['n']:.3f} ({ev['in_kind']}/{ev['n']})" if ev["n"] else "-"
        b = ev["by_category"].get(c)
        return f"{b['k']}/{b['n']}" if b else "-"
    rows = [["everyday_in_kind (k/n)"] + [cell(r) for r in results.values()]]
    rows += [[f"everyday: {c}"] + [cell(r, c) for r in results.values()] for c in CATEGORIES]
    return rows
