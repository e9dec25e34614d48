"""`zero-chatgpt eval`: every trained stage, the same held-out prompts, the same metrics, side by side.

For each stage (pretrain, sft, and the RL stages once trained) it writes RUN_DIR/eval/<stage>.json:
  val_loss         the stage's validation loss (pretrain: the pretrain stage's LM loss on tokens/val, kept;
                   chat stages: loss on the assistant tokens of sft_data/val.jsonl)
  chat_val_loss    loss on the assistant tokens of sft_data/val.jsonl, for every stage (side by side)
  char_f1, rouge_l greedy answers to the held-out eval idioms' questions against the dictionary reference
                   (greedy over repetition-penalized scores, eval.repetition_penalty; `decoding` says which)
  eos_rate         answers that end with eos within the token limit
  repetition_rate  answers in which some 4-gram occurs 3 or more times
  chain_valid      idiom-chaining answers that are a dictionary idiom starting with the right character
  baseline_question_char_f1 / _rouge_l   the same scores for answering with the question itself
  by_kind          the scores per question kind; samples: question, answer, reference
  plain_greedy     char_f1, rouge_l, eos_rate, repetition_rate of plain greedy answers (penalty 1), when
                   eval.repetition_penalty is not 1: what the penalty changes is on the record
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


# ---------------------------------------------------------------- prompts and answers

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


def answer_prompts(model, tok, records: list[dict], *, chat: bool, max_new_tokens: int, batch_size: int,
                   repetition_penalty: float = 1.0, desc: str = "answer"):
    """Greedy answers (Generation objects, in record order) and how many prompts were cut to fit the context.
    With repetition_penalty != 1 the argmax is taken over CTRL-penalized scores (still deterministic).

    Chat stages get the chat template with the generation prompt and stop at <|im_end|>/<|endoftext|>;
    pretrain gets `plain_prompt` and also stops at the end of the line (its natural end of an answer).
    """
    from zero_chatgpt.console import progress
    from zero_chatgpt.generate import generate

    limit = max(8, model.config.max_position_embeddings - max_new_tokens)
    prompts, cut = [], 0
    for r in records:
        ids = tok.encode_chat(r["messages"], add_generation_prompt=True)[0] if chat else tok.encode(plain_prompt(r))
        if len(ids) > limit:      # keep the end: the question and the generation prompt
            ids, cut = ids[-limit:], cut + 1
        prompts.append(ids)
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


def score(records: list[dict], answers: list[str], ended_with_eos: list[bool], idioms: set[str] | None) -> dict:
    """The metrics over one stage's answers: overall (scored kinds), per kind, chaining validity."""
    from zero_chatgpt.data.chat_data import SCORED_KINDS

    per_kind: dict[str, dict[str, list[float]]] = {}
    f1s, rls, chain = [], [], []
    for r, a in zip(records, answers):
        kind = r.get("meta", {}).get("kind", "chat")
        d = per_kind.setdefault(kind, {"char_f1": [], "rouge_l": []})
        if kind == "chain" and idioms is not None:
            chain.append(chain_valid(a, r["meta"]["first_char"], idioms, r["meta"].get("idiom", "")))
            d.setdefault("chain_valid", []).append(float(chain[-1]))
        f, rl = char_f1(a, r["reference"]), rouge_l(a, r["reference"])
        d["char_f1"].append(f)
        d["rouge_l"].append(rl)
        if kind in SCORED_KINDS or kind == "chat":
            f1s.append(f)
            rls.append(rl)
    mean = (lambda xs: sum(xs) / len(xs) if xs else 0.0)
    out = {"char_f1": mean(f1s), "rouge_l": mean(rls), "eos_rate": mean([float(e) for e in ended_with_eos]),
           "repetition_rate": repetition_rate(answers), "n_prompts": len(records), "n_scored": len(f1s),
           "by_kind": {k: {m: mean(v) for m, v in d.items()} | {"n": len(d["char_f1"])}
                       for k, d in sorted(per_kind.items())}}
    if chain:
        out["chain_valid"] = mean([float(c) for c in chain])
    return out


def question_baseline(records: list[dict]) -> dict:
    """The scores of answering every question with the question itself (a floor SFT must beat)."""
    qs = [question_of(r) for r in records]
    s = score(records, qs, [False] * len(qs), None)
    return {"baseline_question_char_f1": s["char_f1"], "baseline_question_rouge_l": s["rouge_l"]}


# ---------------------------------------------------------------- the stage

def trained_stages(run_dir) -> tuple[list[str], list[str]]:
    """(model stages that are complete and current, notes on the others that have a folder), pipeline order."""
    from zero_chatgpt.rundir import stale_reason
    from zero_chatgpt.stages import model_stages
    have, notes = [], []
    for st in model_stages():
        why = stale_reason(run_dir, st.name)
        if why is None:
            have.append(st.name)
        elif (run_dir / st.out).is_dir():
            notes.append(f"{st.name}: {why}")
    return have, notes


def evaluate_stage(ctx, stage: str, tok, eval_recs: list[dict], val, idioms: set[str] | None) -> dict:
    """Answer the eval prompts with `stage`'s model, score them, write eval/<stage>.json (merging what is there)."""
    import json
    import time

    from zero_chatgpt.checkpoint import load_model, stage_model_path
    from zero_chatgpt.io import atomic_write_json
    from zero_chatgpt.train.sft import masked_val_loss

    e = ctx.cfg["eval"]
    t0 = time.perf_counter()
    model = load_model(stage_model_path(ctx.run_dir, stage))
    chat = stage != "pretrain"
    stops = set(tok.stop_ids)
    penalty = float(e["repetition_penalty"])
    res, gens, cut = {}, [], 0
    for rp in ([1.0, penalty] if penalty != 1.0 else [1.0]):
        gens, cut = answer_prompts(model, tok, eval_recs, chat=chat, max_new_tokens=e["max_new_tokens"],
                                   batch_size=e["batch_size"], repetition_penalty=rp,
                                   desc=f"eval {stage}" + (f" (penalty {rp:g})" if penalty != 1.0 else ""))
        answers = [g.text for g in gens]
        eos = [bool(g.tokens) and g.tokens[-1] in stops for g in gens]
        s = score(eval_recs, answers, eos, idioms)
        if rp == penalty:
            res.update(s)
        else:
            res["plain_greedy"] = {k: s[k] for k in ("char_f1", "rouge_l", "eos_rate", "repetition_rate")}
    res["decoding"] = {"greedy": True, "repetition_penalty": penalty, "max_new_tokens": e["max_new_tokens"]}
    res["truncated_answers"] = sum(g.finish_reason == "length" for g in gens)
    res["truncated_prompts"] = cut
    if val is not None and len(val):
        res["chat_val_loss"] = masked_val_loss(model, val, tok.pad_id)
    res["samples"] = [{"kind": r.get("meta", {}).get("kind"), "question": question_of(r), "answer": a,
                       "reference": r["reference"], "eos": bool(x)}
                      for r, a, x in list(zip(eval_recs, answers, eos))[:e["num_samples"]]]
    res["prompt_format"] = "chat template" if chat else "plain text: 问：{question}\\n答："
    res["eval_seconds"] = time.perf_counter() - t0

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
    merged = {**old, **res}
    if chat and "chat_val_loss" in res:
        merged["val_loss"] = res["chat_val_loss"]          # a chat stage's validation loss is the SFT val loss
    del model
    atomic_write_json(path, merged)
    return merged


def run_stage(ctx) -> None:
    from zero_chatgpt.console import UserError, info, table
    import json

    from zero_chatgpt.data.chat_data import read_split
    from zero_chatgpt.io import atomic_write_json
    from zero_chatgpt.rundir import begin, read_marker, sub_key
    from zero_chatgpt.stages import model_stages
    from zero_chatgpt.tokenizer import load_tokenizer
    from zero_chatgpt.train.sft import encode_records

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
        stages = [want]
    else:
        stages = have
    if not stages:
        raise UserError(f"no trained model in {rd.root}: run `zero-chatgpt pretrain --run-dir {rd.root}` first")
    run = begin(ctx, "eval", reads=tuple(stages))   # on skip, the loop below finds every eval/<stage>.json current
    if not (rd.sft_data / "eval.jsonl").exists():
        from zero_chatgpt.train.sft import ensure_sft_data
        ensure_sft_data(ctx)                                  # the held-out prompts, even before SFT ran
    tok = load_tokenizer(rd.tokenizer)
    eval_recs = select_prompts(read_split(rd.sft_data, "eval"), e["num_prompts"], int(ctx.cfg["run"]["seed"]))
    builtin = all(r.get("meta", {}).get("source") == "builtin" for r in eval_recs)
    idioms = None
    if builtin:
        from zero_chatgpt.data.builtin import load_idioms
        idioms = {d["word"] for d in load_idioms()}
    val_recs = read_split(rd.sft_data, "val")[:e["val_samples"]]
    base = question_baseline(eval_recs)
    results, val = {}, None
    for st in stages:
        path = rd.eval / f"{st}.json"
        # the model by its weights (a retrain that changed them is another model), the prompts by sft_data's key
        key = sub_key({"eval": run.closure["eval"], st: run.closure["eval"][f"@{st}"],
                       "sft_data": read_marker(rd.sft_data).get("key")})
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
        res = evaluate_stage(ctx, st, tok, eval_recs, val, idioms)
        res.update(base)
        res["eval_key"] = key
        atomic_write_json(path, res)
        results[st] = res
    cols = ["val_loss", "chat_val_loss", "char_f1", "rouge_l", "eos_rate", "repetition_rate", "chain_valid",
            "truncated_answers"]
    rows = [[c] + [results[s].get(c, "-") for s in results] for c in cols]
    if any("plain_greedy" in r for r in results.values()):
        for c in ("char_f1", "repetition_rate"):
            rows.append([f"{c} (plain greedy)"] + [results[s].get("plain_greedy", {}).get(c, "-") for s in results])
    rows.append(["question-as-answer char_f1 / rouge_l",
                 *[f"{base['baseline_question_char_f1']:.3f} / {base['baseline_question_rouge_l']:.3f}"] * len(results)])
    penalty = float(e["repetition_penalty"])
    how = "greedy" + (f", repetition penalty {penalty:g}" if penalty != 1.0 else "")
    table(["metric", *results], rows,
          title=f"eval: {len(eval_recs)} held-out prompts ({how}) → {rd.eval}/<stage>.json")
    if not run.skip:
        run.complete({"stages": stages})
