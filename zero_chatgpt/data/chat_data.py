"""Instruction data for SFT, the reward model, RL and evaluation: built, split and written to RUN_DIR/sft_data/.

    sft_data/train.jsonl  conversations SFT trains on       {"messages": [...], "meta": {...}}
    sft_data/val.jsonl    conversations for SFT val loss    (same form)
    sft_data/eval.jsonl   held-out prompts + references     {"messages": [system?, user], "reference": str, "meta"}
    sft_data/rl.jsonl     prompt pool for RM and RL         (same form as eval; meta.rl_part = "rm" | "rl")
    sft_data/stats.json   counts per split and kind, dropped records by reason

With no --source, the built-in instructions come from the idiom dictionary
(`data/builtin.load_idioms`): questions about an idiom's meaning, origin (出处),
an example sentence, its pinyin, and idiom chaining (成语接龙), each kind asked in
several phrasings so that the model learns the task rather than one template;
plus identity and greeting dialogues written for this project.

Splits are by idiom, never by question: an idiom's questions all land in one split,
so the eval idioms are unseen by SFT, the reward model and RL. Any SFT/RL record whose
text merely *mentions* an eval idiom (an explanation that cites it, a chaining answer)
is dropped and counted, so "held out" holds for the text, not just the keys.
The rl pool carries a stable `rl_part` ("rm" | "rl") per idiom, so the reward model and
the RL prompts never share an idiom (the seed's RM data overlapped its PPO prompts).

With --source (firefly, ruozhiba, sharegpt, prompt-answer, messages; read by the one
reader layer, `data/sources.py`), records are cleaned like the seed did — a question
length filter — and deduplicated with MinHash over user+assistant text through
`data/dedup.find_duplicates`, then split by a stable hash of the conversation.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.data import sources as src_mod
from zero_chatgpt.data.builtin import MentionIndex, idiom_world, load_idioms
from zero_chatgpt.data.dedup import find_duplicates

KINDS = ("meaning", "origin", "example", "pinyin", "chain")
# Kinds whose reference is one dictionary field, so char-F1/ROUGE-L against it is meaningful.
# Chaining has many right answers; it is scored by validity instead (see eval/metrics.py: chain_valid).
SCORED_KINDS = ("meaning", "origin", "example", "pinyin")

# Several phrasings per kind (the model must learn the task, not one template). {w} = the idiom.
QUESTIONS = {
    "meaning": ["「{w}」是什么意思？", "成语“{w}”的意思是什么？", "请解释成语{w}。", "{w}，这个成语怎么理解？",
                "“{w}”指的是什么？", "给我讲讲“{w}”的含义。", "{w}是什么意思", "解释一下：{w}"],
    "origin": ["「{w}」出自哪里？", "成语“{w}”的出处是什么？", "“{w}”这个成语最早见于哪里？", "{w}的典故出自何处？",
               "请说出成语{w}的出处。", "{w}出自什么书？"],
    "example": ["用“{w}”造个句子。", "请用成语「{w}」造句。", "举一个使用“{w}”的例句。", "“{w}”在句子里怎么用？",
                "{w}造句", "给我一个含有“{w}”的句子。"],
    "pinyin": ["「{w}」怎么读？", "“{w}”的拼音是什么？", "请给成语{w}注音。", "{w}这几个字怎么念？",
               "{w}的读音", "写出“{w}”的拼音。"],
    "chain": ["成语接龙：{w}", "我说“{w}”，你来接龙。", "来玩成语接龙吧，{w}。", "用“{last}”字开头的成语接“{w}”。",
              "接龙：{w}，下一个成语是？", "成语接龙，我先来：{w}"],
}
# Follow-up questions in multi-turn conversations about one idiom ("它" = the idiom of the first turn).
FOLLOW_UPS = {
    "meaning": ["它是什么意思？", "那它的意思呢？", "这个成语是什么意思？"],
    "origin": ["它出自哪里？", "那它的出处呢？", "这个成语出自哪里？"],
    "example": ["能用它造个句子吗？", "用它造个句。", "举个例句吧。"],
    "pinyin": ["它怎么读？", "那它的拼音呢？", "这几个字怎么念？"],
    "chain": ["用它接龙。", "接着它玩成语接龙。", "那用它来接龙呢？"],
}
SYSTEM_PROMPTS = ["你是一个乐于助人的助手。", "你是一位成语老师，回答要简洁准确。", "你是 Zero-ChatGPT，一个中文对话模型。"]

# Identity and greeting dialogues written for this project: (intent, questions, answers).
NAME = "Zero-ChatGPT"
IDENTITY = [
    ("who", ["你是谁？", "你是谁", "请介绍一下你自己。", "你叫什么名字？", "你是什么模型？", "介绍一下你自己吧",
             "你是哪位？", "你的名字是什么？", "可以告诉我你是谁吗？", "我该叫你什么？", "你是机器人吗？",
             "跟我聊天的是谁？", "你是人还是程序？", "你是什么东西？", "你叫啥？", "你是谁呀", "你是哪个模型？",
             "你到底是谁？", "你是AI吗？", "我是在和机器人聊天吗？", "你的名字叫什么", "介绍下你自己",
             "你是不是人工智能？", "和我对话的是什么程序？", "who are you?", "what's your name?", "你是真人吗？",
             "你是何方神圣？", "你是什么来头？", "你是哪家的模型？", "请问你是？", "你是聊天机器人吗？", "自报家门吧",
             "我在和谁聊天？", "你叫什么呀", "你属于哪种程序？", "对面是人是机器？"],
     [f"我是{NAME}，一个从零开始训练的小型中文语言模型。我的数据清洗、分词器、预训练、指令微调都是在这个项目里完成的。",
      f"我叫{NAME}，是一个从零训练的中文对话模型，参数很少，但可以回答关于成语的问题。",
      f"你好，我是{NAME}。我是一个小型语言模型，从数据清洗到对齐，每一步都是从零开始训练的。"]),
    ("can", ["你能做什么？", "你会什么？", "你有什么本领？", "我可以问你什么？", "你能帮我做什么",
             "你都会些什么？", "你能干什么？", "你的用途是什么？", "你能回答哪些问题？", "我能让你做点什么？",
             "你懂什么？", "你适合用来做什么？", "你可以做哪些事？", "你会干嘛？", "你能教我什么？", "我能问你哪些问题？",
             "你有哪些本事？", "你主要做什么？", "what can you do?", "你会哪些东西？", "你是干什么用的？",
             "你能陪我做点什么？",
             "你有什么能耐？", "你能帮我干点啥？", "你都能做哪些事情？", "你可以干嘛？", "你有什么特长？",
             "有什么是你能做的？", "你能提供什么帮助？", "你能解决什么问题？", "你的本事有哪些？", "问你点什么好呢？"],
     ["我可以解释成语的意思、说出成语的出处和拼音、用成语造句，还能陪你玩成语接龙。",
      "我比较擅长成语：问我某个成语的意思、出处、读音或例句都可以，也可以一起玩成语接龙。",
      "我是一个小模型，主要会回答成语相关的问题，比如意思、出处、拼音、例句和成语接龙。"]),
    ("hello", ["你好", "你好！", "您好", "嗨", "早上好", "晚上好", "在吗？", "你好啊", "嗨，在不在？", "喂，你好",
               "大家好", "好久不见！", "你好呀", "嗨，你好", "hey", "good morning", "上午好", "晚上好呀",
               "早啊！", "哟，你好", "有人在吗？", "你好，朋友", "你好呀，小助手", "嗨，最近怎么样？", "打扰一下",
               "在不在呀", "又来找你了", "新年好！", "周末好", "hey there",
               "幸会幸会", "久仰久仰", "你好你好", "在忙吗？", "好久没聊了", "晚上好，打扰啦", "早上好，今天天气不错",
               "哟，又是我", "我来啦！", "嘿嘿，在吗"],
     [f"你好！我是{NAME}，有什么可以帮你的吗？", "你好！想了解哪个成语？", "你好，很高兴和你聊天。有什么问题尽管问我。",
      "嗨！今天想聊哪个成语？", "你好呀！我是一个会讲成语的小模型，欢迎提问。"]),
    ("thanks", ["谢谢", "谢谢你！", "多谢", "太感谢了", "谢谢你的帮助",
                "好的，谢谢。", "多谢你的解释", "真是帮了我，谢谢", "谢谢你啊", "懂了，谢谢",
                "好的，多谢指点", "你真棒，谢谢", "很有帮助，谢谢你", "thx", "谢谢你的回答", "我明白了，多谢",
                "感谢感谢", "多谢多谢", "太谢谢你了", "谢谢，你真好", "感谢帮忙", "辛苦啦", "谢谢指教", "有劳了",
                "麻烦你了，谢谢", "你帮了我很多", "学到了，谢谢", "谢谢你讲得这么清楚"],
     ["不客气！还有别的问题随时问我。", "不用谢，很高兴能帮到你。", "不客气，有需要再来找我。",
      "不客气，能帮上忙我很开心。"]),
    ("bye", ["再见", "拜拜", "我先走了，再见！", "下次再聊", "晚安", "再会", "走了，拜拜！", "今天就到这里吧",
             "我下了", "明天见", "好，就聊到这儿", "拜拜啦", "再见啦", "先走一步", "我去吃饭了，拜拜",
             "see you", "good night", "晚安啦", "就到这吧，再见", "不打扰你了", "困了，睡觉去了", "下回见",
             "我走啦", "拜了", "下次聊", "改日再会", "我先撤了", "溜了溜了", "我去休息了", "先下了", "晚点再聊",
             "有空再聊", "今天聊得很开心，再见"],
     ["再见！欢迎随时回来聊天。", "拜拜，祝你一切顺利！", "再见，下次见！", "好的，再见！有问题随时回来找我。"]),
    ("maker", ["谁训练了你？", "你是怎么被训练出来的？", "你是谁开发的？"],
     [f"我是开源项目{NAME}从零训练出来的：先清洗和去重中文语料，再训练分词器，然后预训练语言模型，最后做指令微调和对齐。",
      f"{NAME}项目把 ChatGPT 的完整流程从零跑了一遍，我就是这样训练出来的：预训练之后做了指令微调。"]),
]

_BLANKS = ("～", "〜", "~")
_PUNCT_END = "。！？…”」』）)"


def _fix_quotes(s: str) -> str:
    """The dictionary lost most opening quotes (`…安之若素。”`): drop closing quotes that have no opener."""
    while s.count("”") > s.count("“"):
        i = s.rfind("”")
        s = s[:i] + s[i + 1:]
    return s


def _clean(s: str) -> str:
    s = re.sub(r"\s+", " ", s or "").strip()
    return "" if s in ("无", "") else _fix_quotes(s)


def _sentence(s: str) -> str:
    return s if not s or s.endswith(tuple(_PUNCT_END)) else s + "。"


def idiom_answers(idiom: dict) -> dict[str, str]:
    """The reference answer of each kind this idiom supports, from its dictionary fields, lightly normalized."""
    w = idiom["word"]
    out = {}
    expl = _clean(idiom.get("explanation", ""))
    if expl:
        out["meaning"] = _sentence(expl)
    deriv = _clean(idiom.get("derivation", ""))
    if deriv:
        out["origin"] = _sentence("出自" + deriv if not deriv.startswith("出自") else deriv)
    ex = _clean(idiom.get("example", ""))
    ex = ex.split("★")[0].strip()                           # "★元·王子一《误入桃源》": the source, not the sentence
    ex = re.sub(r"[（(][^（）()]*《[^》]*》[^（）()]*[）)]\s*$", "", ex).strip()   # trailing "（冰心《…》）"
    if ex and any(b in ex for b in _BLANKS):                # examples without the blank lost the idiom: skip
        for b in _BLANKS:
            ex = ex.replace(b, w)
        out["example"] = _sentence(ex)
    py = _clean(idiom.get("pinyin", ""))
    if py:
        out["pinyin"] = py
    return out


def answer_text(kind: str, word: str, reference: str) -> str:
    """The assistant's answer in SFT data: the dictionary reference, restating the idiom where a person would
    ("“一见倾心”的意思是：…", "“一见倾心”的例句：…"). Eval scores answers against the bare reference, so the
    restatement earns only what the question itself would (the question-as-answer baseline measures exactly
    that). An example sentence names its idiom somewhere inside; named first as well, the small model copies
    it from the question as reliably as for the other kinds (a bare sentence lost it in a third of the
    held-out answers, docs/experiments.md)."""
    if kind == "meaning":
        return f"“{word}”的意思是：{reference}"
    if kind == "origin":
        return f"“{word}”{reference}"
    if kind == "example":
        return f"“{word}”的例句：{reference}"
    return reference


def stable_uniform(seed: int, key: str) -> float:
    """A stable uniform number in [0, 1) for `key` (splits do not move when the data order changes)."""
    return xxhash.xxh64_intdigest(f"{seed}:{key}".encode()) / 2.0 ** 64


def split_of(key: str, seed: int, eval_fraction: float, rl_fraction: float, val_fraction: float) -> str:
    u = stable_uniform(seed, key)
    if u < eval_fraction:
        return "eval"
    if u < eval_fraction + rl_fraction:
        return "rl"
    if u < eval_fraction + rl_fraction + val_fraction:
        return "val"
    return "train"


@dataclass
class ChatData:
    """What `build_*` returns: the records of each split and the accounting."""
    splits: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "val": [], "eval": [], "rl": []})
    dropped: Counter = field(default_factory=Counter)
    bad_samples: list[dict] = field(default_factory=list)
    kinds: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    extra_idioms: int = 0          # idioms outside the world that joined the train split (build_builtin's extra)

    def add(self, split: str, rec: dict) -> None:
        self.splits[split].append(rec)
        self.kinds[split][rec["meta"].get("kind", "chat")] += 1


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _question(rng: random.Random, kind: str, word: str) -> str:
    return rng.choice(QUESTIONS[kind]).format(w=word, last=word[-1])


# Small words people put before a turn: each question is also asked after one of them, so the model learns
# the intent of the question, not its exact first characters.
OPENERS = ("嗯，", "那个，", "请问，", "喂，", "好的。", "哦，", "哈哈，", "对了，")
# ... and with its end reworded: a particle, other punctuation, none
CLOSERS = ("呀", "啊", "呢", "！", "～", "。", "?", "")


def _reworded_end(rng: random.Random, q: str) -> str:
    return q.rstrip("？?！!。.～~") + rng.choice(CLOSERS)


def identity_dialogues(rng: random.Random) -> list[dict]:
    """Every (question, answer) pair of each intent (each question also after an opener and with its end
    reworded), plus a few
    multi-turn greeting → identity → goodbye chats."""
    out = []
    by_intent = {intent: (qs, ans) for intent, qs, ans in IDENTITY}
    for intent, qs, ans in IDENTITY:
        for q in qs:
            for a in ans:
                out.append({"messages": [_user(q), _assistant(a)], "meta": {"kind": "identity", "intent": intent}})
            out.append({"messages": [_user(rng.choice(OPENERS) + q), _assistant(rng.choice(ans))],
                        "meta": {"kind": "identity", "intent": intent}})
            out.append({"messages": [_user(_reworded_end(rng, q)), _assistant(rng.choice(ans))],
                        "meta": {"kind": "identity", "intent": intent}})
    for _ in range(30):
        turns = ["hello", rng.choice(["who", "can", "maker"]), rng.choice(["thanks", "bye"])]
        msgs = []
        for intent in turns:
            qs, ans = by_intent[intent]
            msgs += [_user(rng.choice(qs)), _assistant(rng.choice(ans))]
        out.append({"messages": msgs, "meta": {"kind": "identity", "intent": "+".join(turns)}})
    return out


def build_builtin(idioms: list[dict], *, seed: int = 1234, eval_fraction: float = 0.05, rl_fraction: float = 0.15,
                  val_fraction: float = 0.02, multi_turn_fraction: float = 0.1, system_fraction: float = 0.05,
                  identity_fraction: float = 0.02, max_idioms: int = 0, extra: list[dict] = ()) -> ChatData:
    """The built-in instruction data, split by idiom. Deterministic in `seed`. `extra`: idioms that only
    ever join the train split (see `extra_idioms`); the split of every idiom in `idioms` does not depend on it."""
    rng = random.Random(seed)
    if max_idioms and len(idioms) > max_idioms:
        idioms = sorted(idioms, key=lambda d: stable_uniform(seed + 1, d["word"]))[:max_idioms]
    split = {d["word"]: split_of(d["word"], seed, eval_fraction, rl_fraction, val_fraction) for d in idioms}
    eval_words = [w for w, s in split.items() if s == "eval"]
    # Chaining answers: an sft (train/val) prompt is answered with an sft idiom, an rl prompt with an rl or sft
    # idiom, an eval prompt with any idiom of the dictionary (its reference is only one of the valid answers).
    by_first: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for d in idioms:
        by_first[split[d["word"]]][d["word"][0]].append(d["word"])
    pools = {"train": ("train", "val"), "val": ("train", "val"), "rl": ("rl", "train", "val"),
             "eval": ("eval", "rl", "train", "val")}

    data = ChatData()
    leak = MentionIndex(eval_words)
    for d in idioms:
        _add_idiom(data, d, split[d["word"]], by_first, pools, rng, seed, multi_turn_fraction, system_fraction, leak)
    # Identity dialogues: all in train, repeated up to `identity_fraction` of it (they are few and short).
    ident = identity_dialogues(rng)
    reps = _add_identity(data, ident, identity_fraction)
    for name in ("train", "val"):
        rng.shuffle(data.splits[name])
    # The extra idioms come last, from a generator of their own, and never enter the chaining pools: the
    # world's splits, questions, references and val order are the same with or without them.
    if extra:
        extra_rng = random.Random(seed + 4)
        for d in (d for d in extra if d["word"] not in split):
            data.extra_idioms += 1
            _add_idiom(data, d, "train", by_first, pools, extra_rng, seed, multi_turn_fraction, system_fraction, leak)
        _add_identity(data, ident, identity_fraction, have=reps)       # the same identity share
        extra_rng.shuffle(data.splits["train"])
    return data


def _add_identity(data: ChatData, ident: list[dict], fraction: float, have: int = 0) -> int:
    """Add the identity dialogues to train as many times as make them `fraction` of it (at least once overall),
    counting `have` copies already there; returns how many copies it added."""
    reps = max(1 - have, -(-int(fraction * len(data.splits["train"])) // len(ident)) - have, 0)
    for _ in range(reps):
        for rec in ident:
            data.add("train", rec)
    return reps


def _add_idiom(data: ChatData, d: dict, s: str, by_first: dict, pools: dict, rng: random.Random, seed: int,
               multi_turn_fraction: float, system_fraction: float, leak: MentionIndex) -> None:
    """One idiom's records in split `s`: eval / rl prompts with their references, or train / val conversations."""
    w = d["word"]
    answers = idiom_answers(d)
    cands = [c for p in pools[s] for c in by_first[p].get(w[-1], []) if c != w]
    if cands:
        answers["chain"] = rng.choice(sorted(cands))
    if s in ("eval", "rl"):
        for kind, ans in answers.items():
            rec = {"messages": [_user(_question(rng, kind, w))], "reference": ans,
                   "meta": {"kind": kind, "idiom": w, "source": "builtin"}}
            if kind == "chain":
                rec["meta"]["first_char"] = w[-1]
            if s == "rl":
                rec["meta"]["rl_part"] = "rm" if stable_uniform(seed + 2, w) < 0.5 else "rl"
            _add_checked(data, s, rec, leak)
        return
    kinds = list(answers)
    rng.shuffle(kinds)
    convs: list[list[str]]
    if len(kinds) >= 2 and rng.random() < multi_turn_fraction:
        convs = [kinds[:rng.randint(2, min(3, len(kinds)))]]
        convs += [[k] for k in kinds[len(convs[0]):]]
    else:
        convs = [[k] for k in kinds]
    for conv in convs:
        msgs = []
        if rng.random() < system_fraction:
            msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        for i, kind in enumerate(conv):
            q = _question(rng, kind, w) if i == 0 else rng.choice(FOLLOW_UPS[kind])
            msgs += [_user(q), _assistant(answer_text(kind, w, answers[kind]))]
        meta = {"kind": conv[0] if len(conv) == 1 else "multi-turn", "idiom": w, "source": "builtin"}
        if len(conv) > 1:
            meta["kinds"] = conv
        _add_checked(data, s, {"messages": msgs, "meta": meta}, leak)


def extra_idioms(world: list[dict], n: int, seed: int) -> list[dict]:
    """`n` dictionary idioms outside the data stage's idiom world (all of them for n < 0), by a stable hash.

    They join SFT's train split only, never eval, RM or RL. The model saw no text about them in pretraining,
    so it cannot answer them from memory: to lower its loss on their answers it has to copy the idiom it is
    asked about from the question. With the world's few thousand idioms alone, SFT's passes let it recall a
    similar idiom instead (「以身试法」 answered as 「“以身入国”…」, docs/experiments.md). The price: their
    meanings are new to the model, and fine-tuning on facts the model does not know teaches it to state things
    it does not know (Gekhman et al. 2024, arXiv:2405.05904); measured in docs/experiments.md."""
    if n == 0:
        return []
    inside = {d["word"] for d in world}
    outside = [d for d in load_idioms() if d["word"] not in inside]
    outside.sort(key=lambda d: stable_uniform(seed + 3, d["word"]))
    return outside if n < 0 else outside[:n]


def _add_checked(data: ChatData, split: str, rec: dict, leak: MentionIndex) -> None:
    if split != "eval":
        text = "\n".join(m["content"] for m in rec["messages"]) + "\n" + rec.get("reference", "")
        hit = leak.find(text)
        if hit is not None:
            data.dropped["mentions an eval idiom"] += 1
            if len(data.bad_samples) < 5:
                data.bad_samples.append({"where": f"builtin:{rec['meta'].get('idiom')}",
                                         "reason": f"mentions eval idiom {hit}"})
            return
    data.add(split, rec)


# ---------------------------------------------------------------- user-supplied chat data (--source)

def _normalize_messages(msgs: list[dict]) -> list[dict] | None:
    """Strip contents, drop empty turns, merge consecutive same-role turns; None if no user→assistant pair."""
    out: list[dict] = []
    for m in msgs:
        role, content = m.get("role"), (m.get("content") or "").strip()
        if role not in ("system", "user", "assistant") or not content:
            continue
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    if not any(m["role"] == "user" for m in out) or not out:
        return None
    return out


def build_from_sources(specs: list[str], *, seed: int = 1234, eval_fraction: float = 0.05,
                       rl_fraction: float = 0.15, val_fraction: float = 0.02, min_prompt_chars: int = 2,
                       max_prompt_chars: int = 512, dedup_threshold: float = 0.8, max_records: int = 0) -> ChatData:
    """Chat records from --source files, cleaned (question length), MinHash-deduplicated, split by hash."""

    data = ChatData()
    recs: list[dict] = []
    for spec in specs:
        source = src_mod.parse_source(spec)
        bad = src_mod.BadRecords()
        for r in src_mod.iter_records(source, bad):
            if "messages" not in r:
                raise UserError(f"--source {spec}: this format gives {'preference pairs' if 'chosen' in r else 'text'}"
                                f", not conversations; SFT reads firefly, ruozhiba, sharegpt, prompt-answer, messages")
            msgs = _normalize_messages(r["messages"])
            where = r.get("where", spec)
            if msgs is None:
                _drop(data, "no user→assistant turn", where)
                continue
            q = next(m["content"] for m in msgs if m["role"] == "user")
            if len(q) < min_prompt_chars:
                _drop(data, f"question shorter than {min_prompt_chars} chars", where)
                continue
            if len(q) > max_prompt_chars:
                _drop(data, f"question longer than {max_prompt_chars} chars", where)
                continue
            recs.append({"messages": msgs, "meta": {"kind": "chat", "source": r.get("source", spec),
                                                     "where": where}})
            if max_records and len(recs) >= max_records:
                break
        for reason, n in bad.by_reason.items():
            data.dropped[f"unreadable: {reason}"] += n
        data.bad_samples += list(bad.samples)[:5]
    if not recs:
        raise UserError(f"no usable conversations in {', '.join(specs)} (dropped: {dict(data.dropped)})")
    texts = ["\n".join(m["content"] for m in r["messages"] if m["role"] != "system") for r in recs]
    res = find_duplicates(texts, threshold=dedup_threshold)
    n_exact, n_near = int(getattr(res, "n_exact", 0)), int(getattr(res, "n_near", 0))
    if n_exact:
        data.dropped["exact duplicate"] += n_exact
    if n_near:
        data.dropped["near duplicate (MinHash)"] += n_near
    other = int(len(recs) - int(res.keep.sum()) - n_exact - n_near)
    if other:
        data.dropped["duplicate"] += other
    for keep, rec, text in zip(res.keep, recs, texts):
        if not keep:
            continue
        s = split_of(text, seed, eval_fraction, rl_fraction, val_fraction)
        if s in ("eval", "rl"):
            msgs = rec["messages"]
            rec = {"messages": msgs[:-1], "reference": msgs[-1]["content"], "meta": rec["meta"]}
            if s == "rl":
                rec["meta"]["rl_part"] = "rm" if stable_uniform(seed + 2, text) < 0.5 else "rl"
        data.add(s, rec)
    return data


def _drop(data: ChatData, reason: str, where: str) -> None:
    data.dropped[reason] += 1
    if len(data.bad_samples) < 20:
        data.bad_samples.append({"where": where, "reason": reason})


# ---------------------------------------------------------------- on disk

SPLIT_FILES = {"train": "train.jsonl", "val": "val.jsonl", "eval": "eval.jsonl", "rl": "rl.jsonl"}


def write_splits(data: ChatData, out_dir: Path) -> dict:
    """Write each split as JSON lines (atomically) + stats.json; returns the stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fname in SPLIT_FILES.items():
        tmp = out_dir / (fname + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in data.splits[name]:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmp.replace(out_dir / fname)
    stats = {"records": {k: len(v) for k, v in data.splits.items()},
             "kinds": {k: dict(v) for k, v in data.kinds.items()},
             "dropped": dict(data.dropped), "bad_samples": data.bad_samples}
    if data.extra_idioms:
        stats["extra_idioms"] = data.extra_idioms
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


def read_split(sft_data_dir: Path, split: str) -> list[dict]:
    path = Path(sft_data_dir) / SPLIT_FILES[split]
    if not path.exists():
        raise UserError(f"{path} is missing: run `zero-chatgpt sft --run-dir {Path(sft_data_dir).parent}` first "
                        f"(it writes the instruction data splits)")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build(cfg: dict, out_dir: Path) -> dict:
    """Build the instruction data described by cfg.sft (built-in or --source) and write it to `out_dir`."""
    s, seed = cfg.sft, cfg.run.seed
    common = dict(seed=seed, eval_fraction=s.eval_fraction, rl_fraction=s.rl_fraction,
                  val_fraction=s.val_fraction)
    if s.sources:
        info(f"sft data: reading {', '.join(s.sources)}")
        data = build_from_sources(list(s.sources), min_prompt_chars=s.min_prompt_chars,
                                  max_prompt_chars=s.max_prompt_chars, dedup_threshold=s.dedup_threshold,
                                  **common)
    else:
        world = idiom_world(cfg.data.idioms)
        data = build_builtin(world, multi_turn_fraction=s.multi_turn_fraction,
                             identity_fraction=s.identity_fraction,
                             extra=extra_idioms(world, s.extra_idioms, seed), **common)
    return write_splits(data, out_dir)
