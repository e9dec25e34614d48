"""`zero-chatgpt report`: the run's report card, in RUN_DIR/report/.

  report.md      the card in Markdown, its plots linked from plots/
  report.html    the same card in one self-contained page: CSS inline, plots as data: URIs, no script,
                 nothing fetched; it opens from file:// on any machine (report/document.py)
  plots/*.png    the plots (report/plots.py: matplotlib's Agg canvas, ASCII text only)
  timings.json   written by every command that runs a stage (core/timings.py); read here

The card reads what the stages wrote and recomputes no metric: data/stats.json (the funnel), the
tokenizer's record, logs/<stage>.jsonl (loss curves), eval/<stage>_train.json (reward, gold char_f1 and
KL of the RL stages), eval/rm.json, eval/<stage>.json (the eval stage's metrics on the same held-out prompts,
its paired differences to SFT with their bootstrap intervals, the answers), timings.json and the config.
A part that is not there is said to be "not run", with the command that makes it: the card works on a
run directory at any point of the recipe.

It is a derived stage: it skips itself while none of what it reads changed (those files, every stage's
record, the config, this version); --force draws it again.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

from zero_chatgpt import __version__
from zero_chatgpt.core import config as config_mod
from zero_chatgpt.core import timings
from zero_chatgpt.core.console import SMALL_N, info, share, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import fingerprint_files
from zero_chatgpt.core.io import atomic_write_bytes, atomic_write_text
from zero_chatgpt.core.registry import PIPELINE, model_stages
from zero_chatgpt.core.rundir import MARKER, begin, read_marker, stale_reason, sub_key
from zero_chatgpt.data.clean import funnel_rows
from zero_chatgpt.eval.benchmarks import TABLE_HEADER, table_row
from zero_chatgpt.eval.everyday import table_rows
from zero_chatgpt.eval.metrics import format_diff
from zero_chatgpt.report import document as doc
from zero_chatgpt.report import plots

# the metrics of the side-by-side table, as eval/metrics.py names them
EVAL_ROWS = ("char_f1", "rouge_l", "restates_idiom", "pinyin_exact", "pinyin_syllable_acc", "chain_valid", "eos_rate",
             "repetition_rate", "refusal_rate", "everyday_in_kind", "win_rate_vs_sft", "kl_to_sft")
RATES = [m for m in EVAL_ROWS if m != "kl_to_sft"]        # in [0, 1]: one bar chart, one forest plot
CURVE_STAGES = tuple(s.name for s in PIPELINE if s.trained and not s.aligns)    # pretrain, sft, rm
RL_STAGES = tuple(s.name for s in PIPELINE if s.aligns)                         # ppo, dpo, grpo
SAMPLE_QUESTIONS = 6


def _json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _log(rd, stage: str, bad: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of logs/<stage>.jsonl, one per step (the last one written wins).

    A line that is not UTF-8 JSON (cut by a kill mid-write, a damaged disk, an edit) is skipped, as the
    data readers skip a bad record, and "file:line: why" goes to `bad`: one bad line costs one point of a
    curve, not the card."""
    bad = [] if bad is None else bad
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    path = Path(rd.logs) / f"{stage}.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return [], []
    for n, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append(f"{path}:{n}: not UTF-8")
            continue
        except ValueError:
            if raw.strip():
                bad.append(f"{path}:{n}: not JSON")
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            (evals if rec.get("kind") == "eval" else train)[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def bad_lines_note(bad: list[str]) -> str:
    """One line on the skipped log lines: how many, the first few as file:line, what to do."""
    return (f"skipped {len(bad)} unreadable log line(s) ({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}): "
            f"those steps are missing from the curves, the rest is drawn; nothing else is affected (the figures in "
            f"eval/ and the models do not come from the logs), so there is nothing to redo")


class Run:
    """What the stages left in the run directory, read once."""

    def __init__(self, ctx):
        self.ctx, self.rd = ctx, ctx.run_dir
        self.where = str(self.rd.root)
        self.names = [st.name for st in PIPELINE if st.name != "report"]
        self.markers = {st.name: read_marker(self.rd / st.out) for st in PIPELINE if st.name != "report"}
        self.stale = {n: (stale_reason(self.rd, n) if self.markers[n] else "not run") for n in self.names}
        self.stats = _json(self.rd.data / "stats.json")
        self.bad_log_lines: list[str] = []
        self.logs = {s: _log(self.rd, s, self.bad_log_lines) for s in (*CURVE_STAGES, *RL_STAGES)}
        curves = _json(self.rd.eval / "rl_curves.json") or {}
        self.rl = {s: _json(self.rd.eval / f"{s}_train.json") or curves.get(s) for s in RL_STAGES}
        self.rm = _json(self.rd.eval / "rm.json")
        self.evals = {}
        for st in model_stages():
            res = _json(self.rd.eval / f"{st.name}.json")
            if isinstance(res, dict):
                self.evals[st.name] = res
        self.timings = timings.load(self.rd)

    def status(self, name: str) -> str:
        why = self.stale[name]
        return "done" if why is None else "not run" if why == "not run" else f"not current: {why}"

    def seconds(self, name: str) -> float | None:
        """What building stage `name` took: timings.json's entry, else what its own record says."""
        e = self.timings.get("stages", {}).get(name) or {}
        return e.get("seconds", self.markers[name].get("seconds"))

    def run_hint(self, name: str) -> str:
        return f"not run: `zero-chatgpt {name} --run-dir {self.where}`"

    def evaluated(self) -> list[str]:
        return [s for s, r in self.evals.items() if "char_f1" in r]


# ---------------------------------------------------------------- headlines (the summary table, both places)

def headline(r: Run, name: str) -> str:
    """One line on what stage `name` produced ("" when it has nothing to say)."""
    m = r.markers.get(name, {})
    summ = m.get("summary") or {}
    if name == "data" and r.stats:
        return f"{r.stats['docs_out']:,} of {r.stats['docs_in']:,} documents kept"
    if name == "tokenizer" and summ.get("vocab_size"):
        cpt = chars_per_token(summ.get("tokens", {}).get("val", {}))
        return f"{summ['vocab_size']:,} tokens" + (f", {cpt:.2f} chars/token (val)" if cpt else "")
    if name == "sft" and "char_f1" in r.evals.get("sft", {}):
        return f"char_f1 {r.evals['sft']['char_f1']:.3f}, eos_rate {r.evals['sft'].get('eos_rate', 0):.3f}"
    if name in ("pretrain", "sft") and summ.get("val_loss") is not None:
        return f"val loss {summ['val_loss']:.3f}" + (f" after {summ['steps']:,} steps" if summ.get("steps") else "")
    if name == "rm" and r.rm:
        ga = r.rm.get("gold_agreement")
        return f"accuracy {share(r.rm['accuracy'], r.rm.get('val_pairs'))}" + \
            (f", gold agreement {share(ga, r.rm.get('gold_pairs'))}" if ga is not None else "")
    if name in RL_STAGES and name in r.evals and "char_f1" in r.evals[name]:
        d = r.evals[name].get("vs_sft", {}).get("char_f1")
        return f"char_f1 {r.evals[name]['char_f1']:.3f}" + (f" ({format_diff(d)} vs sft)" if d else "")
    if name == "eval" and r.evaluated():
        n = max(r.evals[s].get("n_prompts", 0) for s in r.evaluated())
        return f"{len(r.evaluated())} models on {n:,} held-out prompts"
    return ""


def safe_headline(r: Run, name: str) -> str:
    try:
        return headline(r, name)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        return f"(its figures could not be read: {type(e).__name__}: {e})"


def chars_per_token(split: dict) -> float | None:
    """Characters per token as the tokenizer stage prints it: not counting the <|endoftext|> of each document."""
    toks = split.get("tokens", 0) - split.get("docs", 0)
    return split["chars"] / toks if toks > 0 and split.get("chars") else None


# ---------------------------------------------------------------- sections

def overview(r: Run) -> list:
    cfg = r.ctx.cfg
    rows = [[n, r.status(n), safe_headline(r, n), r.seconds(n)] for n in r.names]
    return [doc.h(1, "zero-chatgpt report card"),
            doc.p(f"Run directory {r.where} (preset {cfg.run.preset}), made by zero-chatgpt "
                  f"{__version__}."),
            doc.table(["stage", "status", "result", "time (s)"], rows)]


def data_section(r: Run) -> list:
    out = [doc.h(2, "Data")]
    s = r.stats
    if not s:
        return out + [doc.note(r.run_hint("data"))]
    rows = funnel_rows(s)
    out.append(doc.p(f"{s['docs_in']:,} documents ({s['chars_in']:,} characters) in, {s['docs_out']:,} "
                     f"({s['chars_out']:,} characters) out: {s['train_docs']:,} train, {s['val_docs']:,} val."))
    out.append(doc.table(["step", "documents", "left", "note"], rows, "the funnel: every document read is kept "
                         "or counted under one reason"))
    bars = [(rows[0][0], rows[0][1], "in")] + [(x[0], -x[1], "drop") for x in rows[1:-1] if x[1]] + \
           [(rows[-1][0], rows[-1][1], "out")]
    out.append(doc.img("data_funnel.png", plots.funnel(bars, "data funnel: documents in, dropped, out"),
                       "data funnel"))
    if len(s.get("by_source", {})) > 0:
        out.append(doc.table(["source", "documents in", "documents out", "kept"],
                             [[k, v["docs_in"], v["docs_out"], f"{v['docs_out'] / max(1, v['docs_in']):.1%}"]
                              for k, v in s["by_source"].items()], "by source"))
    if s.get("pii_masked"):
        out.append(doc.p("Personal data masked: " + ", ".join(f"{k} {v:,}" for k, v in s["pii_masked"].items()) + "."))
    samples = [[reason, (x[0] if x else {}).get("where", ""), _snippet((x[0] if x else {}).get("text", ""))]
               for reason, x in (s.get("dropped_samples") or {}).items()]
    if samples:
        out.append(doc.table(["dropped for", "where", "text (start)"], samples, "one dropped document per reason"))
    return out


def _snippet(text: str, n: int = 120) -> str:
    """The start of a document on one line (its line breaks as " / ")."""
    one = " / ".join(x.strip() for x in str(text).splitlines() if x.strip())
    return one if len(one) <= n else one[:n] + "…"


def tokenizer_section(r: Run) -> list:
    out = [doc.h(2, "Tokenizer")]
    summ = r.markers["tokenizer"].get("summary") or {}
    if not summ.get("vocab_size"):
        return out + [doc.note(r.run_hint("tokenizer"))]
    rows = [["vocabulary size", summ["vocab_size"]]]
    for split, v in (summ.get("tokens") or {}).items():
        rows += [[f"{split} documents", v.get("docs")], [f"{split} tokens", v.get("tokens")],
                 [f"{split} characters per token", chars_per_token(v)]]
    if summ.get("train_s") is not None:
        rows.append(["training time (s)", summ["train_s"]])
    return out + [doc.table(["tokenizer", "value"], rows, "characters per token: without the end-of-text "
                                                           "token after each document")]


def curves_section(r: Run) -> list:
    out = [doc.h(2, "Training curves")]
    if r.bad_log_lines:
        out.append(doc.note(bad_lines_note(r.bad_log_lines)))
    rows = []
    for stage in CURVE_STAGES:
        train, evals = r.logs[stage]
        if not train:
            out.append(doc.note(f"{stage}: " + r.run_hint(stage)))
            continue
        loss = {"train loss": [(x["step"], x.get("loss")) for x in train]}
        others: dict = {}
        for k in sorted({k for e in evals for k in e} - {"step", "kind"}):
            if "bpc" in k:
                continue                  # the same figure as val_loss in other units
            (loss if "loss" in k else others)[f"{k} (eval)"] = [(e["step"], e.get(k)) for e in evals]
        panels = [("loss", loss)] + [(k.removesuffix(" (eval)"), {k: v}) for k, v in others.items()]
        out.append(doc.img(f"loss_{stage}.png", plots.curves(f"{stage}: loss over steps", panels), f"{stage} loss"))
        last_eval = evals[-1] if evals else {}
        rows.append([stage, train[-1]["step"], train[0].get("loss"), train[-1].get("loss"),
                     ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items()
                               if k not in ("step", "kind") and isinstance(v, float)) or "-",
                     train[-1].get("tokens") or "-"])     # the reward model counts pairs, not tokens
    if rows:
        out.append(doc.table(["stage", "steps", "first loss", "last loss", "last evaluation", "tokens"], rows))
    pre = r.evals.get("pretrain", {})
    # the eval stage keeps the pretrain stage's own samples as pretrain_samples beside its answers
    samples = pre.get("pretrain_samples") or (pre.get("samples") if "char_f1" not in pre else None)
    if samples:
        out.append(doc.table(["prompt", "the pretrained model continues"],
                             [[x.get("prompt", ""), x.get("text", "")] for x in samples[:4]],
                             "pretrained model samples"))
    return out


def rl_section(r: Run) -> list:
    out = [doc.h(2, "Alignment: reward, gold char_f1, KL")]
    rows = []
    for stage in RL_STAGES:
        c = r.rl.get(stage)
        if not c:
            out.append(doc.note(f"{stage}: " + r.run_hint(stage)))
            continue
        steps, gold, sel = c.get("steps") or [], c.get("gold") or [], c.get("selected_step")
        series = lambda *keys: {k: [(x.get("step"), x.get(k)) for x in steps] for k in keys  # noqa: E731
                                if any(x.get(k) is not None for x in steps)}
        gold_pts = {"gold char_f1 (eval)": [(g.get("step"), g.get("gold_char_f1")) for g in gold]}
        if stage == "dpo":             # its reward is implicit: the policy's log-ratio margin; KL: see eval
            panels = [("reward margin", series("reward_margin")), ("gold char_f1", gold_pts),
                      ("reward accuracy", series("reward_accuracy"))]
        else:
            rew = series("reward", "rm_score", "rule_reward")
            for k in ("rm_score", "rule_reward"):
                if k in rew and rew[k] == rew.get("reward"):
                    del rew[k]                # the reward is this one alone: one line, not two on top
            panels = [("reward", rew), ("gold char_f1", gold_pts), ("KL to SFT (nats per answer)", series("kl"))]
        out.append(doc.img(f"rl_{stage}.png", plots.curves(f"{stage}: over training steps", panels, mark=sel,
                                                           mark_label=f"final = step {sel}"), f"{stage} curves"))
        key = "reward_margin" if stage == "dpo" else "reward"
        vals = [x.get(key) for x in steps if x.get(key) is not None]
        kls = [x.get("kl") for x in steps if x.get("kl") is not None]
        g0 = next((g.get("gold_char_f1") for g in gold if g.get("step") == 0), None)
        gs = next((g.get("gold_char_f1") for g in gold if g.get("step") == sel), None)
        rows.append([stage, c.get("trained_steps"), sel, c.get("stopped") or "-",
                     f"{vals[0]:.3f} → {vals[-1]:.3f}" if vals else "-", f"{kls[0]:.3f} → {kls[-1]:.3f}" if kls else "-",
                     f"{g0:.3f} → {gs:.3f}" if g0 is not None and gs is not None else doc.cell(gs)])
    if rows:
        out.append(doc.table(["stage", "steps", "final = step", "stopped", "reward first → last",
                              "KL first → last", "gold char_f1: SFT → final"], rows,
                             "gold char_f1: greedy answers to held-out gold prompts, which pick the final step; "
                             "DPO's reward is its implicit margin"))
    return out


def rm_section(r: Run) -> list:
    out = [doc.h(2, "Reward model")]
    rm = r.rm
    if not rm:
        return out + [doc.note(r.run_hint("rm"))]
    counts = rm.get("pairs_by_negative") or {}
    # a share on enough items stays a number (the table's own format); on few, it carries its n
    fig = lambda v, n: v if v is None or (n or 0) >= SMALL_N else share(v, n)  # noqa: E731
    rows = [["held-out pairs", rm.get("val_pairs")], ["accuracy", fig(rm.get("accuracy"), rm.get("val_pairs"))]]
    rows += [[f"probe_pass: {k}", fig(v, counts.get(k))] for k, v in (rm.get("probe_pass") or {}).items()]
    ga = rm.get("gold_agreement")
    rows.append(["gold_agreement", share(ga, rm.get("gold_pairs")) +
                 (f" of {rm['gold_pairs']:,} pairs" if ga is not None and rm.get("gold_pairs", 0) >= SMALL_N else "")])
    n = rm.get("normalization") or {}
    if n:
        rows.append(["normalization gain / bias", f"{n.get('gain', 0):.3f} / {n.get('bias', 0):.3f}"])
    return out + [doc.table(["reward model", "value"], rows, "probe_pass: share of held-out prompts where a rule-made "
                            "bad answer scores below the reference; gold_agreement: pairs of SFT samples whose "
                            "char_f1 differ by 0.2 or more, ranked as char_f1 ranks them")]


def models_section(r: Run) -> list:
    out = [doc.h(2, "The model after every stage")]
    have = r.evaluated()
    for s in [st.name for st in model_stages() if st.name not in have]:
        out.append(doc.note(f"{s}: " + (r.run_hint(s) if r.status(s) == "not run" else
                                        f"trained, not evaluated: `zero-chatgpt eval --run-dir {r.where}`")))
    if not have:
        return out
    if r.stale.get("eval") not in (None, "not run"):
        out.append(doc.note(f"eval is not current ({r.stale['eval']}): these figures may be of earlier models; "
                            f"`zero-chatgpt eval --run-dir {r.where}` brings them up to date"))
    res = {s: r.evals[s] for s in have}
    ids = {s: tuple(x.get("per_prompt", {}).get("ids", [])) for s, x in res.items()}
    first = res[have[0]]
    same = len(set(ids.values())) == 1
    if not same:
        out.append(doc.note("these stages were evaluated on different prompts: their figures do not compare; "
                            f"`zero-chatgpt eval --run-dir {r.where} --force` asks them all the same"))
    part = first.get("prompt_set", {})
    dec = first.get("decoding", {})
    out.append(doc.p(f"{first.get('n_prompts', 0):,} held-out test prompts{', the same for every stage' if same else ''}"
                     f" (of the {doc.cell(part.get('test_prompts'))} in the test part; the "
                     f"{doc.cell(part.get('gold_prompts'))} of the gold part pick the RL checkpoints and are never "
                     f"reported here), answered {'greedily' if dec.get('greedy', True) else 'by sampling'}"
                     + (f" with repetition penalty {dec['repetition_penalty']:g}"
                        if dec.get("repetition_penalty", 1.0) != 1.0 else "")
                     + f", at most {dec.get('max_new_tokens', '?')} new tokens."))
    # everyday_in_kind rests on 45 questions, 9 a category: its rows carry their k/n (eval/everyday.py: table_rows)
    rows = [[m] + [x.get(m) for x in res.values()] for m in ("chat_val_loss", *EVAL_ROWS, "mean_length")
            if m != "everyday_in_kind" and any(m in x for x in res.values())]
    rows += table_rows(res)
    out.append(doc.table(["metric", *have], rows, "the eval stage's figures (eval/<stage>.json); everyday: "
                         "everyday user turns in phrasings SFT never saw, answered in kind (eval/everyday.py)"))
    if first.get("baseline_question_char_f1") is not None:
        out.append(doc.p(f"A floor: answering every question with the question itself scores char_f1 "
                         f"{first['baseline_question_char_f1']:.3f}, rouge_l "
                         f"{first.get('baseline_question_rouge_l', 0):.3f}."))
    out.append(doc.img("eval_metrics.png", plots.grouped_bars("held-out metrics by stage", RATES, have,
                                                              {s: {m: res[s][m] for m in RATES if m in res[s]}
                                                               for s in have}), "metrics by stage"))
    compared = [s for s in have if s != "sft" and res[s].get("vs_sft")]
    if compared:
        label = {"win_rate_vs_sft": "win_rate_vs_sft − 0.5"}
        drows = [[label.get(m, m)] + [format_diff(res[s]["vs_sft"].get(m)) for s in compared] for m in EVAL_ROWS
                 if any(m in res[s]["vs_sft"] for s in compared)]
        out.append(doc.table(["stage − sft", *compared], drows, "paired by prompt: mean difference [95 % bootstrap "
                             "interval]; * = 0 is outside the interval (an interval holding 0 is noise)"))
        # pretrain's gap to SFT is large and expected: drawn beside the aligned stages it would squash them
        shown = [s for s in compared if s != "pretrain"] or compared
        diffs = {s: {m: res[s]["vs_sft"][m] for m in RATES if m in res[s]["vs_sft"]} for s in shown}
        out.append(doc.img("diff_vs_sft.png", plots.intervals(f"difference to SFT: {', '.join(shown)}", RATES, diffs),
                           "difference to SFT with 95% intervals"))
    elif "sft" not in have:
        out.append(doc.note(f"no differences to SFT: sft is not evaluated (`zero-chatgpt eval --run-dir {r.where}`)"))
    return out + answers(res)


def benchmarks_section(r: Run) -> list:
    """C-Eval / CMMLU, where `zero-chatgpt eval --bench` scored them (eval/bench_NAME.json)."""
    found = {p.stem[len("bench_"):]: _json(p) for p in sorted(r.rd.eval.glob("bench_*.json"))}
    found = {k: v for k, v in found.items() if isinstance(v, dict) and v.get("stages")}
    if not found:
        return []
    out = [doc.h(2, "Standard benchmarks")]
    for name, res in found.items():
        rows = [table_row(st, x) for st, x in res["stages"].items()]
        out.append(doc.table(TABLE_HEADER, rows,
                             f"{name}: {res['questions']:,} questions in {res['subjects']} subjects ({res['split']} "
                             f"split), {res['shots']}-shot, scored as lm-evaluation-harness does; chance "
                             f"{res['chance']:.2f}"))
        if res.get("bad_rows"):
            out.append(doc.note(f"{name}: {res['bad_rows']} rows of the files were not questions and were skipped, "
                                f"e.g. {'; '.join(res.get('bad_samples', [])[:2])}"))
    return out


def answers(res: dict) -> list:
    """The answers of every evaluated stage to the first sample questions (the same ids for all)."""
    out = [doc.h(2, "Answers side by side")]
    order = next(iter(res.values())).get("samples", [])[:SAMPLE_QUESTIONS]
    if not order:
        return out + [doc.note("no sample answers in eval/<stage>.json")]
    if "pretrain" in res:
        out.append(doc.p(f"pretrain is asked as {res['pretrain'].get('prompt_format', 'plain text')}; the chat stages "
                         "through the chat template."))
    for i, q in enumerate(order, 1):
        out.append(doc.h(3, f"{i}. [{q.get('kind') or 'chat'}] {q.get('question', '')}"))
        if q.get("reference"):
            out.append(doc.p(f"reference: {q['reference']}"))
        rows = []
        for s, x in res.items():
            a = _answer_of(x, q.get("id"))
            ended = None if a is None or a.get("eos") is None else ("yes" if a["eos"] else "no (token limit)")
            rows.append([s, "(not asked)" if a is None else a.get("answer", ""), (a or {}).get("char_f1"), ended])
        out.append(doc.table(["stage", "answer", "char_f1", "ended"], rows))
    return out


def _answer_of(res: dict, pid) -> dict | None:
    """A stage's answer to prompt `pid` with its scores: from its samples, else from its per-prompt lists."""
    smp = next((y for y in res.get("samples", []) if y.get("id") == pid), None)
    if smp is not None:
        return smp
    pp = res.get("per_prompt", {})
    if pid not in pp.get("ids", []) or "answer" not in pp:
        return None
    j = pp["ids"].index(pid)
    pick = lambda k: pp[k][j] if k in pp else None   # noqa: E731
    return {"answer": pp["answer"][j], "char_f1": pick("char_f1"), "eos": pick("eos_rate")}


def run_section(r: Run) -> list:
    out = [doc.h(2, "Run")]
    t = r.timings
    stages = t.get("stages", {})
    rows = []
    for n in r.names:
        e = stages.get(n)
        if e:
            rows.append([n, e.get("action"), e.get("seconds"), e.get("finished") or "-", e.get("host", "")])
        elif r.markers[n].get("seconds") is not None:
            rows.append([n, "(from its .stage.json)", r.markers[n]["seconds"], r.markers[n].get("finished", "-"), ""])
    if rows:
        total = sum(float(x[2] or 0) for x in rows)
        out.append(doc.table(["stage", "how it was built", "seconds", "finished", "machine"],
                             rows + [["total", "", round(total, 1), "", ""]],
                             f"stage timings ({timings.path_of(r.rd)}); a stage that was up to date keeps the "
                             "time of the command that built it"))
    else:
        out.append(doc.note("no stage timings yet: `zero-chatgpt run` records them"))
    machines = dict(t.get("machines", {}))
    here = platform.node() or "this machine"
    if here not in machines:
        machines[f"{here} (this report)"] = timings.machine()
    keys = ("cpu", "cores", "usable_cores", "memory_gib", "gpu", "os", "python", "torch", "zero_chatgpt")
    out.append(doc.table(["machine", *keys], [[k, *[m.get(x) for x in keys]] for k, m in machines.items()],
                         "hardware and versions"))
    out.append(doc.p("The resolved config of this run (config.toml):"))
    out.append(doc.pre(config_mod.dumps(r.ctx.cfg), fold=True))
    return out


# ---------------------------------------------------------------- the stage

def _inputs_key(ctx) -> str:
    """What the card is drawn from: the files it reads, every stage's record, the timings (without the
    card's own entry), the config and this version."""
    root = Path(ctx.run_dir.root)
    files = [root / "data" / "stats.json", *sorted(root.glob("eval/*.json")), *sorted(root.glob("logs/*.jsonl")),
             *[root / st.out / MARKER for st in PIPELINE if st.name != "report"]]
    files = [(str(f.relative_to(root)), f) for f in files if f.is_file()]
    t = timings.load(ctx.run_dir)
    t["stages"].pop("report", None)
    return sub_key({"files": fingerprint_files(files, None), "stages": t["stages"], "machines": t["machines"],
                    "config": config_mod.dumps(ctx.cfg), "version": __version__})


SECTIONS = {"Data": data_section, "Tokenizer": tokenizer_section, "Training curves": curves_section,
            "Reward model": rm_section, "Alignment": rl_section, "The model after every stage": models_section,
            "Standard benchmarks": benchmarks_section, "Run": run_section}


def build(ctx) -> tuple[list, Run]:
    r = Run(ctx)
    if r.bad_log_lines:
        info(f"report: {bad_lines_note(r.bad_log_lines)}")
    blocks = overview(r)
    for title, section in SECTIONS.items():
        try:
            blocks += section(r)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            # a file in a shape this version does not know (written by another version, edited by hand):
            # the rest of the card is still worth having; this part says what failed
            why = f"{title}: could not be drawn ({type(e).__name__}: {e}); the files it reads may be from " \
                  f"another version of zero-chatgpt: run that stage again, then `zero-chatgpt report --force`"
            info(f"report: {why}")
            blocks += [doc.h(2, title), doc.note(why)]
    return blocks, r


def write(rd, blocks: list, title: str) -> Path:
    """report.md, report.html and plots/*.png (plots of an earlier card that this one lacks are removed)."""
    out = Path(rd.report)
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    names = set()
    for b in blocks:
        if b.kind == "img":
            atomic_write_bytes(pdir / b.name, b.png)
            names.add(b.name)
    for old in pdir.glob("*.png"):
        if old.name not in names:
            old.unlink()
    atomic_write_text(out / "report.md", doc.to_markdown(blocks))
    atomic_write_text(out / "report.html", doc.to_html(blocks, title))
    return out / "report.html"


def run_stage(ctx) -> None:
    rd = ctx.run_dir
    built = [st.name for st in PIPELINE if st.name != "report" and read_marker(rd / st.out)]
    if not built:
        raise UserError(f"nothing to report in {rd.root}: no stage has run there; check --run-dir, or run "
                        f"`zero-chatgpt run --run-dir {rd.root}` first")
    # its key is the content of what it reads (every stage's record among it), not the stages' closures:
    # a card is drawn of any run directory, also one whose stages disagree on what they were built from
    run = begin(ctx, "report", reads=(), extra={"report.inputs": _inputs_key(ctx)})
    html = rd.report / "report.html"
    if run.skip and html.exists() and (rd.report / "report.md").exists():
        info(f"report: {html}")
        return
    blocks, r = build(ctx)
    write(rd, blocks, f"zero-chatgpt report card: {r.where}")
    table(["stage", "status", "result"], [[n, r.status(n), safe_headline(r, n)] for n in r.names],
          title=f"report: {rd.report / 'report.md'}")
    info(f"report: {html}")
    run.complete({"stages": [n for n in r.names if r.stale[n] is None], "plots": sum(b.kind == "img" for b in blocks)})
