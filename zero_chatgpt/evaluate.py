"""`zero-chatgpt eval`: every trained stage, the same held-out prompts, the same metrics, side by side.

For each stage (pretrain, sft, and the RL stages once trained) it writes RUN_DIR/eval/<stage>.json:
  val_loss         the stage's validation loss (pretrain: C's LM loss on tokens/val, kept as written;
                   chat stages: loss on the assistant tokens of sft_data/val.jsonl)
  chat_val_loss    loss on the assistant tokens of sft_data/val.jsonl, for every stage (side by side)
  char_f1, rouge_l greedy answers to the held-out eval idioms' questions against the dictionary reference
  eos_rate         answers that end with eos within the token limit
  repetition_rate  answers in which some 4-gram occurs 3 or more times
  chain_valid      idiom-chaining answers that are a dictionary idiom starting with the right character
  baseline_question_char_f1 / _rouge_l   the same scores for answering with the question itself
  by_kind          the scores per question kind; samples: question, answer, reference
Chat stages are asked through the chat template; `pretrain` (no template yet) gets the same
questions as plain-text prompts "问：…\n答：".
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

# ---------------------------------------------------------------- metrics
#
# Units: each CJK character is a unit, a run of letters/digits (pinyin syllables, English words, numbers)
# is one unit, punctuation and spaces are dropped — the "mixed segmentation" of the CMRC 2018 evaluation
# script (Cui et al., 2019), so a pinyin answer is scored by syllables, not by Latin letters.

def _is_cjk(ch: str) -> bool:
    # Ideographs (and kana) are letters ("Lo") at or above U+2E80; CJK punctuation (U+3000…) is not.
    return ord(ch) >= 0x2E80 and unicodedata.category(ch) == "Lo"


def _is_word(ch: str) -> bool:
    return ch.isalnum() and not _is_cjk(ch)


def units(text: str, keep_punct: bool = False) -> list[str]:
    """CJK characters one by one, letter/digit runs as words; punctuation only when `keep_punct`."""
    text = unicodedata.normalize("NFKC", text or "")
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if _is_cjk(ch):
            out.append(ch)
            i += 1
        elif _is_word(ch) or unicodedata.category(ch) == "Mn" and out and i > 0 and _is_word(text[i - 1]):
            j = i + 1
            while j < n and (_is_word(text[j]) or unicodedata.category(text[j]) == "Mn"):
                j += 1
            out.append(text[i:j].lower())
            i = j
        else:
            if keep_punct and not ch.isspace():
                out.append(ch)
            i += 1
    return out


def char_f1(pred: str, ref: str) -> float:
    """Character-level F1 (bag of units): 2PR/(P+R) with P = overlap/|pred|, R = overlap/|ref|."""
    p, r = units(pred), units(ref)
    if not p or not r:
        return float(p == r)
    overlap = sum((Counter(p) & Counter(r)).values())
    if overlap == 0:
        return 0.0
    prec, rec = overlap / len(p), overlap / len(r)
    return 2 * prec * rec / (prec + rec)


def _lcs(a: Sequence, b: Sequence) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1 on characters (units): longest common subsequence, 2PR/(P+R) (Lin, 2004)."""
    p, r = units(pred), units(ref)
    if not p or not r:
        return float(p == r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def eos_rate(finish_reasons: Iterable[str]) -> float:
    """Share of answers that ended with an eos/stop token ("stop") rather than at the token limit ("length")."""
    f = list(finish_reasons)
    return sum(1 for x in f if x == "stop") / len(f) if f else 0.0


def is_repetitive(text: str, n: int = 4, min_count: int = 3) -> bool:
    """True when some n-gram of units (punctuation kept) occurs `min_count` or more times."""
    u = units(text, keep_punct=True)
    c = Counter(tuple(u[i:i + n]) for i in range(len(u) - n + 1))
    return bool(c) and max(c.values()) >= min_count


def repetition_rate(texts: Iterable[str], n: int = 4, min_count: int = 3) -> float:
    """Share of answers in which some 4-gram occurs 3 or more times."""
    t = list(texts)
    return sum(is_repetitive(x, n, min_count) for x in t) / len(t) if t else 0.0


def chain_valid(answer: str, first_char: str, idioms: set[str], asked: str = "") -> bool:
    """An idiom-chaining answer is right when it is a dictionary idiom (not the one asked) starting with first_char."""
    a = re.sub(r"[\s。！？，、“”「」《》.!?,\"']", "", answer or "")
    return a in idioms and a.startswith(first_char) and a != asked
