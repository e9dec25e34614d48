"""The eval metrics, each defined once: text overlap (char_f1, rouge_l), idiom checks, loops, refusals, the
reward model's win rate, the KL to SFT along an answer, per-prompt values and their aggregates, and the
paired bootstrap that compares two stages prompt by prompt. What each metric means in eval/<stage>.json
is told in stages/eval.py."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np
import torch

from zero_chatgpt.data.chat_data import SCORED_KINDS
from zero_chatgpt.eval.pinyin import pinyin_exact, pinyin_syllable_acc
from zero_chatgpt.model.reward_model import answer_ids, prompt_ids

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


def restates_idiom(answer: str, idiom: str) -> bool:
    """The answer names the idiom it was asked about (NFKC, spaces ignored): a person's answer to "what does
    X mean" says "X means ...", which SFT's data teaches (chat_data.answer_text); a bare explanation, or one
    of another idiom, does not."""
    norm = lambda t: "".join(unicodedata.normalize("NFKC", t or "").split())  # noqa: E731
    return bool(idiom) and norm(idiom) in norm(answer)


# ---------------------------------------------------------------- refusals
#
# A refusal declines or pleads ignorance instead of answering. The patterns are anchored where a refusal
# says it (an apology or "I don't know" opens the answer; "as an AI", "cannot answer/provide" anywhere)
# and were checked against every reference answer of the built-in dictionary (~97k texts: explanations,
# origins, example sentences written in the first person), none of which they match.
REFUSAL_PATTERNS = (
    r"^我?(?:很|非常|十分|实在)?(?:抱歉|对不起|不好意思)",
    r"^(?:我|这个问题我)(?:真的|确实|暂时|目前|并|也)?(?:不知道|不清楚|不太清楚|不确定|不太确定|不了解|回答不了|答不上来"
    r"|无法回答|不能回答|没法回答|无法提供|不能提供|无法确定)",
    r"作为(?:一个|一名|一款)?(?:ai|人工智能|语言模型|机器人|智能助手|聊天机器人)",
    r"(?:无法|不能|没法|没有办法)(?:回答|提供|帮助你|帮你|协助你|满足你|满足您|为你|为您)",
    r"(?:超出|超过)了?我的(?:能力|知识)",
    r"^(?:不知道|不清楚|不晓得)[。.!！]?$",
)


_REFUSAL = [re.compile(p, re.IGNORECASE) for p in REFUSAL_PATTERNS]


def is_refusal(text: str) -> bool:
    """True when the answer refuses or pleads ignorance (REFUSAL_PATTERNS, after NFKC and leading punctuation)."""
    t = unicodedata.normalize("NFKC", text or "").strip().lstrip("“”\"'「」『』(（)）,，.。!！:：").strip()
    return any(rx.search(t) for rx in _REFUSAL)


def paired_bootstrap(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict | None:
    """{"diff": mean(x - y), "ci95": [lo, hi], "n"} for paired values (same prompts, same order): the
    percentile bootstrap of the mean difference, resampling prompts with replacement `resamples` times
    (numpy, vectorized, seeded: the same data and seed give the same interval). None without pairs;
    no "ci95" with resamples = 0."""

    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    n = len(d)
    if n == 0:
        return None
    out = {"diff": float(d.mean()), "n": int(n)}
    if resamples <= 0:
        return out
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    step = max(1, 4_000_000 // n)                     # at most ~32 MB of indices at a time
    for s in range(0, resamples, step):
        k = min(step, resamples - s)
        means[s:s + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    out["ci95"] = [float(lo), float(hi)]
    return out


def format_diff(d: dict | None) -> str:
    """'+0.012 [−0.004, +0.027]' (3 decimals; 1 for differences of 10 or more); '*' when 0 is outside."""
    if not d:
        return "-"
    big = max(abs(d["diff"]), *(abs(v) for v in d.get("ci95", [0.0]))) >= 10

    def f(v: float) -> str:             # U+2212 minus: the table aligns these cells like text, all alike
        return (f"{v:+.1f}" if big else f"{v:+.3f}").replace("-", "\u2212")
    if "ci95" not in d:
        return f(d["diff"])
    lo, hi = d["ci95"]
    return f"{f(d['diff'])} [{f(lo)}, {f(hi)}]" + (" *" if lo > 0 or hi < 0 else "")


def kl_along(model, ref_model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 32,
             pad_id: int = 0) -> list[float | None]:
    """Per prompt, the mean over the answer's tokens of KL(model || ref_model) at the positions that predict
    them, exact over the vocabulary: sum_v p(v) (log p(v) - log q(v)). One forward of each model over
    prompt + answer (right-padded, so padding never reaches a real position). None for an empty answer."""

    device = next(model.parameters()).device
    chunk = max(1, (1 << 24) // model.config.vocab_size)      # ~64 MB of fp32 logits per tensor
    seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
    order = sorted((i for i in range(len(seqs)) if answers[i]), key=lambda i: len(seqs[i]))
    out: list[float | None] = [None] * len(seqs)
    with torch.inference_mode(), model.fused_for_inference(), ref_model.fused_for_inference():
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                start = len(prompts[i]) - 1               # the position that predicts the first answer token
                rows += [r] * len(answers[i])
                cols += range(start, start + len(answers[i]))
            ids = ids.to(device)
            rows_t, cols_t = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
            hp = model(ids, return_hidden=True)[rows_t, cols_t]
            hq = ref_model(ids, return_hidden=True)[rows_t, cols_t]
            kl = torch.empty(len(rows), dtype=torch.float64, device=device)
            for c in range(0, len(rows), chunk):           # bounded memory: chunk x vocab logits at a time
                lp = model.logits(hp[c:c + chunk]).float().log_softmax(-1)
                lq = ref_model.logits(hq[c:c + chunk]).float().log_softmax(-1)
                kl[c:c + chunk] = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0.0).double()
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows_t, kl)
            for r, i in enumerate(idx):
                out[i] = float(sums[r]) / len(answers[i])
    return out


def rm_scores(scorer, tok, records: list[dict], answers: list[str], ended: list[bool]):
    """The reward model's normalized scores of answers to the records' prompts (as the chat model sees them)."""
    return scorer.score([prompt_ids(tok, r["messages"]) for r in records],
                        [answer_ids(tok, a, e) for a, e in zip(answers, ended)])


def win_rates(mine, theirs, answers: list[str], ended: list[bool], ref_answers: list[str],
              ref_ended: list[bool]) -> list[float]:
    """Per prompt: 1 when the reward model scores the answer (`mine`) above the reference answer (SFT's,
    `theirs`) to the same prompt, 0 below, 0.5 for a tie (an identical answer is a tie without a score)."""
    return [0.5 if (a, e) == (ra, re_) or x == y else float(x > y)
            for a, e, ra, re_, x, y in zip(answers, ended, ref_answers, ref_ended, mine, theirs)]


# The metrics of a stage: per prompt (stored under per_prompt), averaged overall and per kind, compared to
# SFT prompt by prompt. Each is averaged over the prompts of its domain where it is defined (not None).
METRICS = ("char_f1", "rouge_l", "restates_idiom", "pinyin_exact", "pinyin_syllable_acc", "pinyin_toneless",
           "chain_valid", "eos_rate", "repetition_rate", "refusal_rate", "mean_length", "mean_tokens", "kl_to_sft",
           "win_rate_vs_sft")


RESTATE_KINDS = ("meaning", "origin", "example")    # the kinds whose answer names its idiom (chat_data.answer_text)


# what SFT's own value is, where it is a constant: the reference of a paired difference
SFT_CONSTANT = {"kl_to_sft": 0.0, "win_rate_vs_sft": 0.5}


def _in_domain(metric: str, kind: str) -> bool:
    """char_f1 / rouge_l count overall on the kinds with one right answer; the rest where defined."""
    return metric not in ("char_f1", "rouge_l") or kind in SCORED_KINDS or kind == "chat"


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


def per_prompt_values(records: list[dict], answers: list[str], ended_with_eos: list[bool],
                      idioms: set[str] | None, n_tokens: list[int] | None = None) -> dict[str, list]:
    """Every metric's value on each prompt (None where it is not defined), 4 significant digits."""
    out: dict[str, list] = {m: [] for m in METRICS if m not in ("kl_to_sft", "win_rate_vs_sft")}
    for i, (r, a) in enumerate(zip(records, answers)):
        kind, ref = r.get("meta", {}).get("kind", "chat"), r.get("reference", "")
        out["char_f1"].append(sig4(char_f1(a, ref)))
        out["rouge_l"].append(sig4(rouge_l(a, ref)))
        idiom = r.get("meta", {}).get("idiom")
        out["restates_idiom"].append(int(restates_idiom(a, idiom)) if kind in RESTATE_KINDS and idiom else None)
        out["pinyin_exact"].append(int(pinyin_exact(a, ref)) if kind == "pinyin" else None)
        acc = pinyin_syllable_acc(a, ref) if kind == "pinyin" else None
        out["pinyin_syllable_acc"].append(None if acc is None else sig4(acc))
        out["pinyin_toneless"].append(int(pinyin_exact(a, ref, tones=False)) if kind == "pinyin" else None)
        out["chain_valid"].append(int(chain_valid(a, r["meta"]["first_char"], idioms, r["meta"].get("idiom", "")))
                                  if kind == "chain" and idioms is not None else None)
        out["eos_rate"].append(int(bool(ended_with_eos[i])))
        out["repetition_rate"].append(int(is_repetitive(a)))
        out["refusal_rate"].append(int(is_refusal(a)))
        out["mean_length"].append(len(a))
        out["mean_tokens"].append(int(n_tokens[i]) if n_tokens is not None else None)
    return out


def aggregate(kinds: list[str], values: dict[str, list]) -> dict:
    """Overall means (each metric over its domain) and per-kind means of per-prompt values."""
    def mean(xs):                       # 6 significant digits: the per-prompt values have 4
        return float(f"{sum(xs) / len(xs):.6g}") if xs else None

    out: dict = {}
    for m in METRICS:
        if m in values:
            v = mean([x for x, k in zip(values[m], kinds) if x is not None and _in_domain(m, k)])
            if v is not None:
                out[m] = v
    by_kind: dict[str, dict] = {}
    for k in sorted(set(kinds)):
        d = {}
        for m in METRICS:
            if m in values:
                v = mean([x for x, kk in zip(values[m], kinds) if kk == k and x is not None])
                if v is not None:
                    d[m] = v
        by_kind[k] = d | {"n": kinds.count(k)}
    out["by_kind"] = by_kind
    return out


def score(records: list[dict], answers: list[str], ended_with_eos: list[bool], idioms: set[str] | None,
          n_tokens: list[int] | None = None) -> dict:
    """The metrics over one stage's answers: overall (each over its domain), per kind."""
    kinds = [r.get("meta", {}).get("kind", "chat") for r in records]
    out = aggregate(kinds, per_prompt_values(records, answers, ended_with_eos, idioms, n_tokens))
    for m in ("char_f1", "rouge_l", "eos_rate", "repetition_rate"):
        out.setdefault(m, 0.0)
    out["n_prompts"] = len(records)
    out["n_scored"] = sum(k in SCORED_KINDS or k == "chat" for k in kinds)
    return out


def compare(kinds: list[str], ids: list[str], values: dict[str, list], ref: dict, resamples: int,
            seed: int) -> dict:
    """vs_sft: per metric, the paired difference to the reference stage's per_prompt values and its interval,
    over the prompts (matched by id) in the metric's domain where both values are defined."""
    ref_pp = ref.get("per_prompt", {})
    where = {pid: j for j, pid in enumerate(ref_pp.get("ids", []))}
    out = {}
    for m in METRICS:
        if m not in values:
            continue
        mine, theirs = [], []
        for i, (pid, k) in enumerate(zip(ids, kinds)):
            j = where.get(pid)
            x = values[m][i]
            y = SFT_CONSTANT[m] if m in SFT_CONSTANT else (ref_pp[m][j] if j is not None and m in ref_pp else None)
            if j is None or x is None or y is None or not _in_domain(m, k):
                continue
            mine.append(x)
            theirs.append(y)
        d = paired_bootstrap(mine, theirs, resamples, seed)
        if d is not None:
            d["diff"] = float(f"{d['diff']:.6g}")
            if "ci95" in d:
                d["ci95"] = [float(f"{v:.6g}") for v in d["ci95"]]
            out[m] = d
    return out
