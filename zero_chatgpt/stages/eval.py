"""`zero-chatgpt eval`: every trained stage, the same held-out prompts, the same metrics, side by side.

The prompts: sft_data/eval.jsonl holds the questions of the eval idioms, which no SFT, RM or RL record
contains. They are split in two parts by a stable hash of the idiom (`meta.idiom`, else the question), so
all questions of one idiom land together: the *gold* part (a share eval.gold_fraction; `gold_prompts`)
is what RL stages select their checkpoints on, the *test* part is what this stage reports, so a
checkpoint chosen for its gold score is not also judged on it. `eval.num_prompts` test prompts are
asked, the kinds taken in turn (`select_prompts`).

For each stage (pretrain, sft, and the RL stages once trained) it writes RUN_DIR/eval/<stage>.json:
  val_loss         the stage's validation loss (pretrain: the pretrain stage's LM loss on tokens/val, kept;
                   chat stages: loss on the assistant tokens of sft_data/val.jsonl)
  chat_val_loss    loss on the assistant tokens of sft_data/val.jsonl, for every stage (side by side)
  char_f1, rouge_l greedy answers against the dictionary reference, over the kinds with one right answer
                   (meaning, origin, example, pinyin; greedy over repetition-penalized scores with
                   eval.repetition_penalty; `decoding` says which)
  restates_idiom   meaning/origin/example questions: the answer names the idiom asked about (`restates_idiom`)
  pinyin_exact     pinyin questions: the answer's pinyin is the dictionary's, tones included
                   (`pinyin_key`); pinyin_toneless: the same with tone marks ignored
  pinyin_syllable_acc  pinyin questions: the share of the reference's syllables the answer has right, position
                   by position, tones included, over max(len(reference), len(answer)) (eval_pinyin.py)
  chain_valid      idiom-chaining answers that are a dictionary idiom starting with the right character
  eos_rate         answers that end with eos within the token limit
  repetition_rate  answers in which some 4-gram occurs 3 or more times
  refusal_rate     answers that refuse or plead ignorance (`REFUSAL_PATTERNS`)
  mean_length      answer length in characters; mean_tokens: in tokens (without the stop token)
  kl_to_sft        mean per-token KL(pi_stage || pi_sft) along the stage's own answers, exact over the
                   vocabulary (`kl_along`); 0 for sft, absent for pretrain (it answers plain-text prompts,
                   which the SFT model was not tuned on: a KL there says little about the chat policy)
  everyday_in_kind chat stages: the share of 45 everyday user turns (greeting, who, can, thanks, goodbye) in
                   phrasings SFT never saw that the stage answers in kind; `everyday`: k/n per category, the
                   answers (eval_everyday.py)
  win_rate_vs_sft  the share of prompts where the reward model (RUN_DIR/rm/final, only while the rm stage
                   is current) scores the stage's answer above SFT's, ties half; absent for sft and
                   without a current reward model
  by_kind          every metric per question kind
  per_prompt       the per-prompt values behind every metric, lists aligned with per_prompt.ids (stable
                   prompt ids, `prompt_id`), plus each prompt's kind and the answer itself; null where a
                   metric is not defined (pinyin_exact off pinyin questions); 4 significant digits
  vs_sft           stages other than sft: per metric, {"diff": mean(stage - sft), "ci95": [lo, hi], "n"},
                   paired by prompt over the prompts where both are defined (for char_f1 / rouge_l the
                   scored kinds, for pinyin_exact the pinyin questions, ...); a percentile bootstrap
                   with eval.bootstrap resamples, seeded with run.seed (`paired_bootstrap`); kl_to_sft and
                   win_rate_vs_sft are compared with SFT's own 0 and 0.5 (a tie)
  baseline_question_char_f1 / _rouge_l   the same scores for answering with the question itself
  samples          question, answer, reference and the answer's own scores, for the first prompts
  prompt_set       which part was asked (test), eval.gold_fraction, the sizes of both parts
  eval_seconds     the stage's evaluation time (answer_seconds: of it, generating the answers)
  plain_greedy     char_f1, rouge_l, eos_rate, repetition_rate of plain greedy answers (penalty 1), when
                   eval.repetition_penalty is not 1: what the penalty changes is on the record
Chat stages are asked through the chat template; `pretrain` (no template yet) gets the same
questions as plain-text prompts "问：…\n答：". The table at the end shows every stage side by side, then
each stage's differences to SFT with their 95 % intervals: a difference whose interval holds 0 is noise.
`--stage X` evaluates X beside SFT (SFT too, when it is not up to date), so X is always compared.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from zero_chatgpt.eval import everyday
# pinyin scoring lives in eval_pinyin.py; its names stay importable from here (grpo.py, the tests)
from zero_chatgpt.eval.pinyin import TONE_MARKS, pinyin_exact, pinyin_key, pinyin_syllable_acc, pinyin_syllables

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


# ---------------------------------------------------------------- paired differences

def paired_bootstrap(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict | None:
    """{"diff": mean(x - y), "ci95": [lo, hi], "n"} for paired values (same prompts, same order): the
    percentile bootstrap of the mean difference, resampling prompts with replacement `resamples` times
    (numpy, vectorized, seeded: the same data and seed give the same interval). None without pairs;
    no "ci95" with resamples = 0."""
    import numpy as np

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


# ---------------------------------------------------------------- prompts and answers

GOLD_SALT = b"zero-chatgpt eval gold part:"


def prompt_group(rec: dict) -> str:
    """What keeps prompts together in one part: the idiom (all its questions), else the question."""
    return rec.get("meta", {}).get("idiom") or question_of(rec)


def is_gold(rec: dict, gold_fraction: float) -> bool:
    """Whether a record is in the gold part: a stable hash of its group (independent of the run seed and
    of the hash that chose the eval idioms, so the parts are an unbiased split of them)."""
    import xxhash
    return xxhash.xxh64_intdigest(GOLD_SALT + prompt_group(rec).encode()) / 2.0 ** 64 < gold_fraction


def split_eval(records: list[dict], gold_fraction: float) -> tuple[list[dict], list[dict]]:
    """(gold, test): the two disjoint parts of the eval records, by idiom."""
    gold, test = [], []
    for r in records:
        (gold if is_gold(r, gold_fraction) else test).append(r)
    return gold, test


def _root(run_dir) -> Path:
    """The folder of a RunDir or a path (a Path has a .root too: "/")."""
    import os
    return Path(run_dir) if isinstance(run_dir, (str, os.PathLike)) else Path(run_dir.root)


def _gold_fraction_of(run_dir) -> float:
    from zero_chatgpt.core import config
    cfg = config.defaults()
    path = _root(run_dir) / config.CONFIG_FILE
    if path.exists():
        cfg = config.merge(cfg, config._read_toml(path), config.defaults(), str(path))
    return float(cfg["eval"]["gold_fraction"])


def gold_prompts(run_dir, n: int, seed: int, gold_fraction: float | None = None) -> list[dict]:
    """Up to n records of the eval split's gold part (the kinds taken in turn, as `select_prompts`), for an
    RL stage to select its checkpoints on; `zero-chatgpt eval` never reports them. gold_fraction: the run's
    eval.gold_fraction (pass cfg["eval"]["gold_fraction"]; None reads it from RUN_DIR/config.toml)."""
    from zero_chatgpt.data.chat_data import read_split
    root = _root(run_dir)
    frac = _gold_fraction_of(root) if gold_fraction is None else float(gold_fraction)
    gold, _ = split_eval(read_split(root / "sft_data", "eval"), frac)
    return select_prompts(gold, n, seed)


def report_prompts(run_dir, n: int, seed: int, gold_fraction: float) -> list[dict]:
    """Up to n records of the test part: what `zero-chatgpt eval` reports."""
    from zero_chatgpt.data.chat_data import read_split
    root = _root(run_dir)
    _, test = split_eval(read_split(root / "sft_data", "eval"), gold_fraction)
    return select_prompts(test, n, seed)


def prompt_id(rec: dict) -> str:
    """A stable id of a prompt (its messages and reference), to pair two stages' answers."""
    import xxhash
    return xxhash.xxh64_hexdigest(json.dumps([rec["messages"], rec.get("reference", "")], ensure_ascii=False,
                                             sort_keys=True).encode())[:12]


def select_prompts(records: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n eval records, the kinds taken in turn (each kind in a seeded order), so every kind is represented."""
    import random

    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("meta", {}).get("kind", "chat"), []).append(r)
    rng = random.Random(seed)
    for k in sorted(by_kind):
        rng.shuffle(by_kind[k])
    out: list[dict] = []
    kinds = sorted(by_kind)
    i = 0
    while len(out) < n and any(by_kind.values()):
        k = kinds[i % len(kinds)]
        if by_kind[k]:
            out.append(by_kind[k].pop())
        i += 1
    return out


def question_of(rec: dict) -> str:
    return next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")


def plain_prompt(rec: dict) -> str:
    """The question as plain text for a model that has never seen the chat template (pretrain)."""
    return f"问：{question_of(rec)}\n答："


def encode_prompts(tok, records: list[dict], *, chat: bool, limit: int) -> tuple[list[list[int]], int]:
    """The prompt ids of each record (chat template or `plain_prompt`), cut to their last `limit` tokens,
    and how many were cut."""
    prompts, cut = [], 0
    for r in records:
        ids = tok.encode_chat(r["messages"], add_generation_prompt=True)[0] if chat else tok.encode(plain_prompt(r))
        if len(ids) > limit:      # keep the end: the question and the generation prompt
            ids, cut = ids[-limit:], cut + 1
        prompts.append(ids)
    return prompts, cut


def answer_prompts(model, tok, records: list[dict], *, chat: bool, max_new_tokens: int, batch_size: int,
                   repetition_penalty: float = 1.0, desc: str = "answer"):
    """Greedy answers (Generation objects, in record order) and how many prompts were cut to fit the context.
    With repetition_penalty != 1 the argmax is taken over CTRL-penalized scores (still deterministic).

    Chat stages get the chat template with the generation prompt and stop at <|im_end|>/<|endoftext|>;
    pretrain gets `plain_prompt` and also stops at the end of the line (its natural end of an answer).
    """
    from zero_chatgpt.core.console import progress
    from zero_chatgpt.model.generate import generate
    from zero_chatgpt.train.rollout import prompt_limit

    prompts, cut = encode_prompts(tok, records, chat=chat, limit=prompt_limit(model, max_new_tokens))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar lengths: little left padding
    gens = [None] * len(prompts)
    bar = progress(total=len(prompts), desc=desc, unit="answer")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0.0,
                        repetition_penalty=repetition_penalty, stop_ids=tok.stop_ids,
                        stop_strings=() if chat else ("\n",), tokenizer=tok)
        for i, g in zip(idx, outs):
            gens[i] = g
        bar.update(len(idx))
    bar.close()
    return gens, cut


def kl_along(model, ref_model, prompts: list[list[int]], answers: list[list[int]], batch_size: int = 32,
             pad_id: int = 0) -> list[float | None]:
    """Per prompt, the mean over the answer's tokens of KL(model || ref_model) at the positions that predict
    them, exact over the vocabulary: sum_v p(v) (log p(v) - log q(v)). One forward of each model over
    prompt + answer (right-padded, so padding never reaches a real position). None for an empty answer."""
    import torch

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
    from zero_chatgpt.model.reward_model import answer_ids, prompt_ids
    return scorer.score([prompt_ids(tok, r["messages"]) for r in records],
                        [answer_ids(tok, a, e) for a, e in zip(answers, ended)])


def win_rates(mine, theirs, answers: list[str], ended: list[bool], ref_answers: list[str],
              ref_ended: list[bool]) -> list[float]:
    """Per prompt: 1 when the reward model scores the answer (`mine`) above the reference answer (SFT's,
    `theirs`) to the same prompt, 0 below, 0.5 for a tie (an identical answer is a tie without a score)."""
    return [0.5 if (a, e) == (ra, re_) or x == y else float(x > y)
            for a, e, ra, re_, x, y in zip(answers, ended, ref_answers, ref_ended, mine, theirs)]


# ---------------------------------------------------------------- scoring

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
    from zero_chatgpt.data.chat_data import SCORED_KINDS
    return metric not in ("char_f1", "rouge_l") or kind in SCORED_KINDS or kind == "chat"


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


def per_prompt_values(records: list[dict], answers: list[str], ended_with_eos: list[bool],
                      idioms: set[str] | None, n_tokens: list[int] | None = None) -> dict[str, list]:
    """Every metric's value on each prompt (None where it is not defined), 4 significant digits."""
    out: dict[str, list] = {m: [] for m in METRICS if m not in ("kl_to_sft", "win_rate_vs_sft")}
    for i, (r, a) in enumerate(zip(records, answers)):
        kind, ref = r.get("meta", {}).get("kind", "chat"), r.get("reference", "")
        out["char_f1"].append(_sig(char_f1(a, ref)))
        out["rouge_l"].append(_sig(rouge_l(a, ref)))
        idiom = r.get("meta", {}).get("idiom")
        out["restates_idiom"].append(int(restates_idiom(a, idiom)) if kind in RESTATE_KINDS and idiom else None)
        out["pinyin_exact"].append(int(pinyin_exact(a, ref)) if kind == "pinyin" else None)
        acc = pinyin_syllable_acc(a, ref) if kind == "pinyin" else None
        out["pinyin_syllable_acc"].append(None if acc is None else _sig(acc))
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
    from zero_chatgpt.data.chat_data import SCORED_KINDS
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


def question_baseline(records: list[dict]) -> dict:
    """The scores of answering every question with the question itself (a floor SFT must beat)."""
    qs = [question_of(r) for r in records]
    s = score(records, qs, [False] * len(qs), None)
    return {"baseline_question_char_f1": s["char_f1"], "baseline_question_rouge_l": s["rouge_l"]}


# ---------------------------------------------------------------- the stage

def trained_stages(run_dir) -> tuple[list[str], list[str]]:
    """(model stages that are complete and current, notes on the others that have a folder), pipeline order."""
    from zero_chatgpt.core.rundir import stale_reason
    from zero_chatgpt.core.registry import model_stages
    have, notes = [], []
    for st in model_stages():
        why = stale_reason(run_dir, st.name)
        if why is None:
            have.append(st.name)
        elif (run_dir / st.out).is_dir():
            notes.append(f"{st.name}: {why}")
    return have, notes


def _compact_json(obj, indent: int = 0) -> str:
    """JSON as atomic_write_json writes it (indent 2), except that a list of plain values is one line: the
    per-prompt lists stay one line per metric."""
    pad = "  " * indent
    if isinstance(obj, dict) and obj:
        items = [f"{pad}  {json.dumps(str(k), ensure_ascii=False)}: {_compact_json(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        return "[\n" + ",\n".join(f"{pad}  {_compact_json(x, indent + 1)}" for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_result(path: Path, res: dict) -> None:
    from zero_chatgpt.core.io import atomic_write_text
    atomic_write_text(path, _compact_json(res) + "\n")


def evaluate_stage(ctx, stage: str, tok, eval_recs: list[dict], val, idioms: set[str] | None,
                   ref: dict | None = None, scorer=None, cache: dict | None = None) -> dict:
    """Answer the eval prompts with `stage`'s model, score them, write eval/<stage>.json (merging what is there).
    ref: SFT's result (with per_prompt) to compare with, for a stage other than sft; scorer: the reward model
    (rewards.RewardScorer) for win_rate_vs_sft, or None; cache: a dict kept across the stages of one eval
    (the reward model's scores of SFT's answers, computed once)."""
    import time

    from zero_chatgpt.core.checkpoint import load_model, stage_model_path
    from zero_chatgpt.core.console import info
    from zero_chatgpt.train.rollout import prompt_limit
    from zero_chatgpt.stages.sft import masked_val_loss

    e = ctx.cfg["eval"]
    t0 = time.perf_counter()
    model = load_model(stage_model_path(ctx.run_dir, stage))
    chat = stage != "pretrain"
    stops = set(tok.stop_ids)
    penalty = float(e["repetition_penalty"])
    kinds = [r.get("meta", {}).get("kind", "chat") for r in eval_recs]
    ids = [prompt_id(r) for r in eval_recs]
    # the SFT model, loaded once: to tell whether this stage kept SFT's weights, else for the KL along its answers
    sft_model = load_model(stage_model_path(ctx.run_dir, "sft")) if stage != "sft" and ref is not None and chat \
        else None
    if sft_model is not None and ref.get("per_prompt", {}).get("ids") == ids and _same_weights(model, sft_model):
        info(f"eval {stage}: its final/ is the SFT model (no trained step beat it on the gold prompts beyond chance): "
             f"SFT's answers, KL 0, every comparison a tie")
        res = _as_sft(ref, kinds, ids, scorer is not None, int(e["bootstrap"]), int(ctx.cfg["run"]["seed"]))
        res["eval_seconds"] = res["answer_seconds"] = time.perf_counter() - t0
        return _write_merged(ctx, stage, res, chat)
    res: dict = {}
    gens, cut, values = [], 0, {}
    for rp in ([1.0, penalty] if penalty != 1.0 else [1.0]):
        gens, cut = answer_prompts(model, tok, eval_recs, chat=chat, max_new_tokens=e["max_new_tokens"],
                                   batch_size=e["batch_size"], repetition_penalty=rp,
                                   desc=f"eval {stage}" + (f" (penalty {rp:g})" if penalty != 1.0 else ""))
        answers = [g.text for g in gens]
        eos = [bool(g.tokens) and g.tokens[-1] in stops for g in gens]
        n_tok = [len(g.tokens) - int(bool(g.tokens) and g.tokens[-1] in stops) for g in gens]
        if rp == penalty:
            values = per_prompt_values(eval_recs, answers, eos, idioms, n_tok)
        else:
            s = score(eval_recs, answers, eos, idioms)
            res["plain_greedy"] = {k: s[k] for k in ("char_f1", "rouge_l", "eos_rate", "repetition_rate")}
    answers = [g.text for g in gens]
    ended = [g.finish_reason == "stop" for g in gens]
    if chat:                                           # pretrain has no chat template to greet through
        res.update(everyday.ask(model, tok, e, idioms, desc=f"everyday {stage}"))
    t_answer = time.perf_counter() - t0

    # the comparisons with SFT: the KL along this stage's answers, the reward model's preference
    if stage == "sft":
        values["kl_to_sft"] = [0.0] * len(eval_recs)
    elif sft_model is not None:
        if sft_model.config.vocab_size == model.config.vocab_size:
            prompts, _ = encode_prompts(tok, eval_recs, chat=True, limit=prompt_limit(model, e["max_new_tokens"]))
            kl = kl_along(model, sft_model, prompts, [g.tokens for g in gens], batch_size=e["batch_size"],
                          pad_id=tok.pad_id)
            values["kl_to_sft"] = [None if x is None else _sig(x) for x in kl]
        else:
            info(f"eval {stage}: no kl_to_sft (its vocabulary differs from the SFT model's)")
        del sft_model
    if ref is not None and scorer is not None and stage != "sft":
        pp = ref.get("per_prompt", {})
        where = {pid: j for j, pid in enumerate(pp.get("ids", []))}
        if all(pid in where for pid in ids) and "answer" in pp:
            js = [where[pid] for pid in ids]
            ref_answers, ref_ended = [pp["answer"][j] for j in js], [bool(pp["eos_rate"][j]) for j in js]
            cache = {} if cache is None else cache
            if cache.get("sft_rm_ids") != ids:
                cache["sft_rm_ids"], cache["sft_rm"] = ids, rm_scores(scorer, tok, eval_recs, ref_answers, ref_ended)
            mine = rm_scores(scorer, tok, eval_recs, answers, ended)
            values["win_rate_vs_sft"] = win_rates(mine, cache["sft_rm"], answers, ended, ref_answers, ref_ended)
        else:
            info(f"eval {stage}: no win_rate_vs_sft (SFT's answers to these prompts are not in eval/sft.json)")

    res.update(aggregate(kinds, values))
    for m in ("char_f1", "rouge_l", "eos_rate", "repetition_rate"):
        res.setdefault(m, 0.0)
    from zero_chatgpt.data.chat_data import SCORED_KINDS
    res["n_prompts"] = len(eval_recs)
    res["n_scored"] = sum(k in SCORED_KINDS or k == "chat" for k in kinds)
    res["decoding"] = {"greedy": True, "repetition_penalty": penalty, "max_new_tokens": e["max_new_tokens"]}
    res["truncated_answers"] = sum(g.finish_reason == "length" for g in gens)
    res["truncated_prompts"] = cut
    if val is not None and len(val):
        res["chat_val_loss"] = masked_val_loss(model, val, tok.pad_id)
    samples = []
    for i in range(min(e["num_samples"], len(eval_recs))):
        r = eval_recs[i]
        smp = {"id": ids[i], "kind": r.get("meta", {}).get("kind"), "question": question_of(r), "answer": answers[i],
               "reference": r.get("reference", ""), "eos": bool(values["eos_rate"][i])}
        smp.update({name: values[m][i] for m, name in (("char_f1", "char_f1"), ("rouge_l", "rouge_l"),
                                                       ("restates_idiom", "restates_idiom"),
                                                       ("pinyin_exact", "pinyin_exact"),
                                                       ("pinyin_syllable_acc", "pinyin_syllable_acc"),
                                                       ("chain_valid", "chain_valid"),
                                                       ("refusal_rate", "refusal"), ("mean_tokens", "tokens"),
                                                       ("kl_to_sft", "kl_to_sft"), ("win_rate_vs_sft", "win_vs_sft"))
                    if m in values and values[m][i] is not None})
        samples.append(smp)
    res["samples"] = samples
    res["prompt_format"] = "chat template" if chat else "plain text: 问：{question}\\n答："
    res["per_prompt"] = {"ids": ids, "kind": kinds, **values, "answer": answers}
    if ref is not None and stage != "sft":
        res["vs_sft"] = compare(kinds, ids, values, ref, int(e["bootstrap"]), int(ctx.cfg["run"]["seed"]))
        res["vs_sft"].update(everyday.compare(res, ref, int(e["bootstrap"]), int(ctx.cfg["run"]["seed"])))
    res["eval_seconds"] = time.perf_counter() - t0
    res["answer_seconds"] = t_answer
    del model
    return _write_merged(ctx, stage, res, chat)


def _same_weights(a, b) -> bool:
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _as_sft(ref: dict, kinds: list[str], ids: list[str], with_rm: bool, resamples: int, seed: int) -> dict:
    """The result of a stage whose weights are SFT's: greedy decoding gives SFT's answers exactly, so its
    per-prompt values are SFT's, its KL to SFT 0 and each reward-model comparison a tie (counted half)."""
    pp = ref["per_prompt"]
    values = {k: list(v) for k, v in pp.items() if k not in ("ids", "kind", "answer")}
    values["kl_to_sft"] = [0.0] * len(ids)
    if with_rm:
        values["win_rate_vs_sft"] = [0.5] * len(ids)
    res = aggregate(kinds, values)
    for k in ("n_prompts", "n_scored", "decoding", "truncated_answers", "truncated_prompts", "chat_val_loss",
              "samples", "prompt_format", "plain_greedy", "everyday_in_kind", "everyday"):
        if k in ref:
            res[k] = ref[k]
    res["samples"] = [{**smp, "kl_to_sft": 0.0, **({"win_vs_sft": 0.5} if with_rm else {})}
                      for smp in res.get("samples", [])]
    res["same_weights_as"] = "sft"
    res["per_prompt"] = {"ids": ids, "kind": kinds, **values, "answer": list(pp["answer"])}
    res["vs_sft"] = compare(kinds, ids, values, ref, resamples, seed)
    res["vs_sft"].update(everyday.compare(res, ref, resamples, seed))     # SFT's answers: a tie
    return res


def _write_merged(ctx, stage: str, res: dict, chat: bool) -> dict:
    """Write eval/<stage>.json: this evaluation's keys over what was there (a training stage's own keys)."""
    path = ctx.run_dir.eval / f"{stage}.json"
    ctx.run_dir.eval.mkdir(parents=True, exist_ok=True)
    old = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    if "samples" in old and "char_f1" not in old:
        old[f"{stage}_samples"] = old.pop("samples")       # the training stage's own samples, kept beside ours
    for k in (*METRICS, "vs_sft", "plain_greedy", "everyday_in_kind", "everyday"):
        old.pop(k, None)                                   # an earlier evaluation's, perhaps not recomputed now
    merged = {**old, **res}
    if chat and "chat_val_loss" in res:
        merged["val_loss"] = res["chat_val_loss"]          # a chat stage's validation loss is the SFT val loss
    write_result(path, merged)
    return merged


TABLE_METRICS = ("val_loss", "chat_val_loss", "char_f1", "rouge_l", "restates_idiom", "pinyin_exact",
                 "pinyin_syllable_acc", "pinyin_toneless", "chain_valid", "eos_rate", "repetition_rate", "refusal_rate",
                 "mean_length", "mean_tokens", "kl_to_sft", "win_rate_vs_sft", "truncated_answers")


def print_tables(results: dict[str, dict], base: dict, n_prompts: int, how: str, where) -> None:
    """Every stage side by side; then each stage's paired differences to SFT with their 95 % intervals."""
    from zero_chatgpt.core.console import table

    rows = [[c] + [results[s].get(c, "-") for s in results] for c in TABLE_METRICS
            if any(c in r for r in results.values())]
    if any("plain_greedy" in r for r in results.values()):
        for c in ("char_f1", "repetition_rate"):
            rows.append([f"{c} (plain greedy)"] + [results[s].get("plain_greedy", {}).get(c, "-") for s in results])
    rows += everyday.table_rows(results)
    rows.append(["question-as-answer char_f1 / rouge_l",
                 *[f"{base['baseline_question_char_f1']:.3f} / {base['baseline_question_rouge_l']:.3f}"] * len(results)])
    table(["metric", *results], rows, title=f"eval: {n_prompts} held-out test prompts ({how}) → {where}/<stage>.json")
    others = [s for s in results if s != "sft" and results[s].get("vs_sft")]
    for start in range(0, len(others), 4):                 # at most 4 stages a table: ~130 columns
        cols = others[start:start + 4]
        label = {"win_rate_vs_sft": "win_rate_vs_sft - 0.5"}      # SFT against itself: a tie
        rows = [[label.get(m, m)] + [format_diff(results[s]["vs_sft"].get(m)) for s in cols] for m in (*METRICS, "everyday_in_kind")
                if any(m in results[s]["vs_sft"] for s in cols)]
        table(["stage - sft", *cols], rows,
              title="difference to SFT, paired by prompt, mean [95 % bootstrap interval]; * = 0 is outside")


def run_stage(ctx) -> None:
    from zero_chatgpt.core.console import UserError, info

    from zero_chatgpt.data.chat_data import read_split
    from zero_chatgpt.core.rundir import begin, read_marker, stale_reason, sub_key
    from zero_chatgpt.core.registry import model_stages
    from zero_chatgpt.model.tokenizer import load_tokenizer
    from zero_chatgpt.stages.sft import encode_records

    rd, e = ctx.run_dir, ctx.cfg["eval"]
    want = ctx.args.get("stage")
    have, notes = trained_stages(rd)
    for n in notes:
        info(f"eval: not evaluating {n}")
    if want:
        valid = [st.name for st in model_stages()]
        if want not in valid:
            raise UserError(f"--stage {want}: unknown stage; valid: {', '.join(valid)}")
        if want not in have:
            raise UserError(f"no current {want} model in {rd.root / want / 'final'}: run "
                            f"`zero-chatgpt {want} --run-dir {rd.root}` first")
        stages = [s for s in have if s in (want, "sft")]   # a stage is always judged beside SFT
    else:
        stages = have
    if not stages:
        raise UserError(f"no trained model in {rd.root}: run `zero-chatgpt pretrain --run-dir {rd.root}` first")
    with_sft = "sft" in stages
    use_rm = with_sft and any(s != "sft" for s in stages) and stale_reason(rd, "rm") is None
    # on skip, the loop below finds every eval/<stage>.json current
    # the metrics and the everyday questions are part of what a result is: a version that changes them redoes it
    run = begin(ctx, "eval", reads=tuple(stages) + (("rm",) if use_rm else ()),
                extra={"eval.metrics": " ".join(METRICS), "eval.everyday": everyday.asked_key()})
    if not (rd.sft_data / "eval.jsonl").exists():
        from zero_chatgpt.stages.sft import ensure_sft_data
        ensure_sft_data(ctx)                                  # the held-out prompts, even before SFT ran
    tok = load_tokenizer(rd.tokenizer)
    seed = int(ctx.cfg["run"]["seed"])
    gold, test = split_eval(read_split(rd.sft_data, "eval"), float(e["gold_fraction"]))
    eval_recs = select_prompts(test, e["num_prompts"], seed)
    if len(eval_recs) < e["num_prompts"]:
        info(f"eval: the test part has {len(test)} prompts (eval.num_prompts = {e['num_prompts']}; the gold part's "
             f"{len(gold)} are kept for the RL stages' checkpoint selection)")
    builtin = all(r.get("meta", {}).get("source") == "builtin" for r in eval_recs)
    idioms = None
    if builtin:
        from zero_chatgpt.data.builtin import load_idioms
        idioms = {d["word"] for d in load_idioms()}
    val_recs = read_split(rd.sft_data, "val")[:e["val_samples"]]
    base = question_baseline(eval_recs)
    own = {k: v for k, v in run.closure["eval"].items() if not k.startswith("@")}   # eval's config values
    data_key = read_marker(rd.sft_data).get("key")
    results, val, scorer, cache = {}, None, None, {}
    for st in sorted(stages, key=lambda s: s != "sft"):    # SFT first: the others are compared with it
        path = rd.eval / f"{st}.json"
        # the model by its weights (a retrain that changed them is another model), the prompts by sft_data's
        # key; a stage compared with SFT also by SFT's weights and the reward model's
        parts = {"eval": own, st: run.closure["eval"][f"@{st}"], "sft_data": data_key}
        if st != "sft" and with_sft:
            parts["vs"] = {"sft": run.closure["eval"]["@sft"], "rm": run.closure["eval"].get("@rm")}
        key = sub_key(parts)
        if not ctx.force and path.exists():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError:
                old = {}
            if old.get("eval_key") == key:
                info(f"eval {st}: up to date in {path} (use --force to redo)")
                results[st] = old
                continue
        if val is None:
            max_len = int(ctx.cfg["sft"]["max_seq_len"])
            val = encode_records(tok, val_recs, max_len, desc="encode val")
        if st != "sft" and use_rm and scorer is None:
            from zero_chatgpt.model.reward_model import RewardScorer
            scorer = RewardScorer.load(rd / "rm" / "final", tok.pad_id, batch_size=e["batch_size"])
        res = evaluate_stage(ctx, st, tok, eval_recs, val, idioms, ref=results.get("sft") if st != "sft" else None,
                             scorer=scorer, cache=cache)
        res.update(base)
        res["prompt_set"] = {"part": "test", "gold_fraction": float(e["gold_fraction"]), "test_prompts": len(test),
                             "gold_prompts": len(gold), "seed": seed}
        res["eval_key"] = key
        write_result(path, res)
        results[st] = res
    results = {s: results[s] for s in stages}              # pipeline order
    penalty = float(e["repetition_penalty"])
    how = "greedy" + (f", repetition penalty {penalty:g}" if penalty != 1.0 else "")
    print_tables(results, base, len(eval_recs), how, rd.eval)
    if not run.skip:
        run.complete({"stages": stages})
