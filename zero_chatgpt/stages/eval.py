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
                   by position, tones included, over max(len(reference), len(answer)) (eval/pinyin.py)
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
                   answers (eval/everyday.py)
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
import time
from pathlib import Path

import torch

from zero_chatgpt.core.checkpoint import load_model, stage_model_path
from zero_chatgpt.core.console import info, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import fingerprint_files
from zero_chatgpt.core.io import atomic_write_text
from zero_chatgpt.core.registry import model_stages
from zero_chatgpt.core.rundir import begin, final_digest, read_marker, stale_reason, sub_key
from zero_chatgpt.data.builtin import load_idioms
from zero_chatgpt.data.chat_data import SCORED_KINDS, read_split
from zero_chatgpt.eval import benchmarks, everyday
from zero_chatgpt.eval.metrics import (
    METRICS,
    aggregate,
    compare,
    format_diff,
    kl_along,
    per_prompt_values,
    rm_scores,
    score,
    sig4,
    win_rates,
)
from zero_chatgpt.eval.prompts import answer_prompts, encode_prompts, prompt_id, question_of, select_prompts, split_eval
from zero_chatgpt.model.generate import answer_ended
from zero_chatgpt.model.reward_model import RewardScorer
from zero_chatgpt.model.tokenizer import load_tokenizer
from zero_chatgpt.train.rollout import prompt_limit
from zero_chatgpt.train.sft_data import encode_records, ensure_sft_data, masked_val_loss

# ---------------------------------------------------------------- the stage

def question_baseline(records: list[dict]) -> dict:
    """The scores of answering every question with the question itself (a floor SFT must beat)."""
    qs = [question_of(r) for r in records]
    s = score(records, qs, [False] * len(qs), None)
    return {"baseline_question_char_f1": s["char_f1"], "baseline_question_rouge_l": s["rouge_l"]}


def trained_stages(run_dir) -> tuple[list[str], list[str]]:
    """(model stages that are complete and current, notes on the others that have a folder), pipeline order."""
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
    atomic_write_text(path, _compact_json(res) + "\n")


def evaluate_stage(ctx, stage: str, tok, eval_recs: list[dict], val, idioms: set[str] | None,
                   ref: dict | None = None, scorer=None, cache: dict | None = None) -> dict:
    """Answer the eval prompts with `stage`'s model, score them, write eval/<stage>.json (merging what is there).
    ref: SFT's result (with per_prompt) to compare with, for a stage other than sft; scorer: the reward model
    (rewards.RewardScorer) for win_rate_vs_sft, or None; cache: a dict kept across the stages of one eval
    (the reward model's scores of SFT's answers, computed once)."""


    e = ctx.cfg.eval
    t0 = time.perf_counter()
    model = load_model(stage_model_path(ctx.run_dir, stage))
    chat = stage != "pretrain"
    stops = set(tok.stop_ids)
    penalty = e.repetition_penalty
    kinds = [r.get("meta", {}).get("kind", "chat") for r in eval_recs]
    ids = [prompt_id(r) for r in eval_recs]
    # the SFT model, loaded once: to tell whether this stage kept SFT's weights, else for the KL along its answers
    sft_model = load_model(stage_model_path(ctx.run_dir, "sft")) if stage != "sft" and ref is not None and chat \
        else None
    if sft_model is not None and ref.get("per_prompt", {}).get("ids") == ids and _same_weights(model, sft_model):
        info(f"eval {stage}: its final/ is the SFT model (no trained step beat it on the gold prompts beyond chance): "
             f"SFT's answers, KL 0, every comparison a tie")
        res = _as_sft(ref, kinds, ids, scorer is not None, e.bootstrap, ctx.cfg.run.seed)
        res["eval_seconds"] = res["answer_seconds"] = time.perf_counter() - t0
        return _write_merged(ctx, stage, res, chat)
    res: dict = {}
    gens, cut, values = [], 0, {}
    for rp in ([1.0, penalty] if penalty != 1.0 else [1.0]):
        gens, cut = answer_prompts(model, tok, eval_recs, chat=chat, max_new_tokens=e.max_new_tokens,
                                   batch_size=e.batch_size, repetition_penalty=rp,
                                   desc=f"eval {stage}" + (f" (penalty {rp:g})" if penalty != 1.0 else ""))
        answers = [g.text for g in gens]
        eos = [answer_ended(g.tokens, stops) for g in gens]
        n_tok = [len(g.tokens) - int(e) for g, e in zip(gens, eos)]
        if rp == penalty:
            values = per_prompt_values(eval_recs, answers, eos, idioms, n_tok)
        else:
            s = score(eval_recs, answers, eos, idioms)
            res["plain_greedy"] = {k: s[k] for k in ("char_f1", "rouge_l", "eos_rate", "repetition_rate")}
    answers = [g.text for g in gens]
    ended = [answer_ended(g.tokens, stops) for g in gens]
    if chat:                                           # pretrain has no chat template to greet through
        res.update(everyday.ask(model, tok, e, idioms, desc=f"everyday {stage}"))
    t_answer = time.perf_counter() - t0

    # the comparisons with SFT: the KL along this stage's answers, the reward model's preference
    if stage == "sft":
        values["kl_to_sft"] = [0.0] * len(eval_recs)
    elif sft_model is not None:
        if sft_model.config.vocab_size == model.config.vocab_size:
            prompts, _ = encode_prompts(tok, eval_recs, chat=True, limit=prompt_limit(model, e.max_new_tokens))
            kl = kl_along(model, sft_model, prompts, [g.tokens for g in gens], batch_size=e.batch_size,
                          pad_id=tok.pad_id)
            values["kl_to_sft"] = [None if x is None else sig4(x) for x in kl]
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
    res["n_prompts"] = len(eval_recs)
    res["n_scored"] = sum(k in SCORED_KINDS or k == "chat" for k in kinds)
    res["decoding"] = {"greedy": True, "repetition_penalty": penalty, "max_new_tokens": e.max_new_tokens}
    res["truncated_answers"] = sum(g.finish_reason == "length" for g in gens)
    res["truncated_prompts"] = cut
    if val is not None and len(val):
        res["chat_val_loss"] = masked_val_loss(model, val, tok.pad_id)
    samples = []
    for i in range(min(e.num_samples, len(eval_recs))):
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
        res["vs_sft"] = compare(kinds, ids, values, ref, e.bootstrap, ctx.cfg.run.seed)
        res["vs_sft"].update(everyday.compare(res, ref, e.bootstrap, ctx.cfg.run.seed))
    res["eval_seconds"] = time.perf_counter() - t0
    res["answer_seconds"] = t_answer
    del model
    return _write_merged(ctx, stage, res, chat)


def _same_weights(a, b) -> bool:
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


def _stages_asked(rd, want: str | None) -> tuple[list[str], list[str]]:
    """The stages to evaluate: `want` (with SFT beside it) or every complete and current one."""
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
    return stages, notes


def run_benchmarks(ctx, specs: list[str]) -> None:
    """`eval --bench NAME:DIR`: C-Eval / CMMLU accuracy of every stage's model beside chance, in
    eval/bench_NAME.json; a stage whose weights, benchmark files and shots are unchanged is not scored again."""
    rd, shots = ctx.run_dir, ctx.args.get("shots", 5)
    stages, _ = _stages_asked(rd, ctx.args.get("stage"))
    tok = load_tokenizer(rd.tokenizer)
    for spec in specs:
        name, root = benchmarks.parse_spec(spec)
        bench = benchmarks.read_benchmark(name, root)
        if bench.bad:
            info(f"{name}: {len(bench.bad)} rows skipped, e.g. " + "; ".join(bench.bad[:3]))
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".csv", ".json"))
        data = fingerprint_files([(str(p.relative_to(root)), p) for p in files], rd.root)
        path = rd.eval / f"bench_{name}.json"
        old = json.loads(path.read_text()).get("stages", {}) if path.exists() and not ctx.force else {}
        res = {"bench": name, "dir": str(root.resolve()), "split": bench.layout.scored, "shots": shots,
               "chance": benchmarks.CHANCE, "subjects": len(bench.subjects), "questions": bench.n_questions,
               "bad_rows": len(bench.bad), "bad_samples": bench.bad[:20], "stages": {}}
        for st in stages:
            key = sub_key({"model": final_digest(rd / st), "data": data, "shots": shots,
                           "scoring": benchmarks.SCORING_VERSION})
            if old.get(st, {}).get("key") == key:
                info(f"eval {name} {st}: up to date in {path} (use --force to redo)")
                res["stages"][st] = old[st]
                continue
            same = next((r for r in res["stages"].values() if r["key"] == key), None)
            if same is not None:                  # the same weights as a stage scored above (RL kept SFT's)
                info(f"eval {name} {st}: the same weights as a stage above, the same scores")
                res["stages"][st] = same
                continue
            t0 = time.time()
            model = load_model(stage_model_path(rd, st)).eval()
            r = benchmarks.score_benchmark(model, tok, bench, shots, batch_size=ctx.cfg.eval.batch_size // 4 or 1,
                                           desc=f"{name} {st}")
            res["stages"][st] = {"key": key, "seconds": round(time.time() - t0, 1), **r}
            info(f"eval {name} {st}: accuracy {r['accuracy']:.3f} of {r['n']:,} questions ({time.time() - t0:.0f} s)")
        rd.eval.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _compact_json(res) + "\n")
        rows = [benchmarks.table_row(st, r) + [f"{r['truncated_prompts']:,}"] for st, r in res["stages"].items()]
        table([*benchmarks.TABLE_HEADER, "prompts cut"], rows,
              title=f"{name} ({bench.layout.scored}, {len(bench.subjects)} subjects, {shots}-shot; chance "
                    f"{benchmarks.CHANCE:.2f}) → {path}")


def run_stage(ctx) -> None:
    if ctx.args.get("bench"):
        return run_benchmarks(ctx, ctx.args["bench"])
    rd, e = ctx.run_dir, ctx.cfg.eval
    stages, notes = _stages_asked(rd, ctx.args.get("stage"))
    with_sft = "sft" in stages
    use_rm = with_sft and any(s != "sft" for s in stages) and stale_reason(rd, "rm") is None
    # on skip, the loop below finds every eval/<stage>.json current
    # the metrics and the everyday questions are part of what a result is: a version that changes them redoes it
    run = begin(ctx, "eval", reads=tuple(stages) + (("rm",) if use_rm else ()),
                extra={"eval.metrics": " ".join(METRICS), "eval.everyday": everyday.asked_key()})
    if not (rd.sft_data / "eval.jsonl").exists():
        ensure_sft_data(ctx)                                  # the held-out prompts, even before SFT ran
    tok = load_tokenizer(rd.tokenizer)
    seed = ctx.cfg.run.seed
    gold, test = split_eval(read_split(rd.sft_data, "eval"), e.gold_fraction)
    eval_recs = select_prompts(test, e.num_prompts, seed)
    if len(eval_recs) < e.num_prompts:
        info(f"eval: the test part has {len(test)} prompts (eval.num_prompts = {e.num_prompts}; the gold part's "
             f"{len(gold)} are kept for the RL stages' checkpoint selection)")
    builtin = all(r.get("meta", {}).get("source") == "builtin" for r in eval_recs)
    idioms = None
    if builtin:
        idioms = {d["word"] for d in load_idioms()}
    val_recs = read_split(rd.sft_data, "val")[:e.val_samples]
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
            max_len = ctx.cfg.sft.max_seq_len
            val = encode_records(tok, val_recs, max_len, desc="encode val")
        if st != "sft" and use_rm and scorer is None:
            scorer = RewardScorer.load(rd / "rm" / "final", tok.pad_id, batch_size=e.batch_size)
        res = evaluate_stage(ctx, st, tok, eval_recs, val, idioms, ref=results.get("sft") if st != "sft" else None,
                             scorer=scorer, cache=cache)
        res.update(base)
        res["prompt_set"] = {"part": "test", "gold_fraction": e.gold_fraction, "test_prompts": len(test),
                             "gold_prompts": len(gold), "seed": seed}
        res["eval_key"] = key
        write_result(path, res)
        results[st] = res
    results = {s: results[s] for s in stages}              # pipeline order
    penalty = e.repetition_penalty
    how = "greedy" + (f", repetition penalty {penalty:g}" if penalty != 1.0 else "")
    print_tables(results, base, len(eval_recs), how, rd.eval)
    if not run.skip:
        run.complete({"stages": stages})
