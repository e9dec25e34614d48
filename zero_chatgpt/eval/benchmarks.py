"""C-Eval and CMMLU: the multiple-choice benchmarks every Chinese model reports, read from the user's disk.

Layouts, as the benchmarks publish them (nothing is downloaded):
- C-Eval (Huang et al. 2023, arXiv:2305.08322): DIR/dev/<subject>_dev.csv and DIR/val/<subject>_val.csv with
  columns id,question,A,B,C,D,answer[,explanation]; the test split has no answers, so `val` is scored.
- CMMLU (Li et al. 2023, arXiv:2306.09212): DIR/dev/<subject>.csv and DIR/test/<subject>.csv with columns
  ,Question,A,B,C,D,Answer (the first one an unnamed row number); `test` is scored.

Scoring is lm-evaluation-harness's, so a figure here means what the harness's `ceval-valid` / `cmmlu` tasks
mean: the prompt is the subject's description, k solved examples from the subject's dev split (the first k),
then the question with its four options and "答案："; each option is the continuation " A" ... " D", scored
by its log-likelihood (the whole string encoded once, the context's tokens cut off, the input cut from the
left to the model's context); the prediction is the most likely letter. tests/eval/test_benchmarks.py checks the
prompts, the log-likelihoods and the accuracy against the harness itself.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from zero_chatgpt.core.console import progress
from zero_chatgpt.core.errors import UserError

SCORING_VERSION = 1            # part of a result's key: raise it when the prompt or the scoring changes
LETTERS = ("A", "B", "C", "D")
CHANCE = 1 / len(LETTERS)
SUBJECT_NAMES = json.loads((Path(__file__).parent / "bench_subjects.json").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Layout:
    """How a benchmark lays out its files and words its prompt."""
    name: str
    scored: str                 # the split with answers that is scored
    file: str                   # a subject's file name in a split folder: {subject}, {split}
    columns: tuple[str, ...]    # question, the four options, answer: the CSV header's names
    description: str            # the prompt's first line: {name} = the subject's Chinese name


LAYOUTS = {
    "ceval": Layout("ceval", "val", "{subject}_{split}.csv", ("question", "A", "B", "C", "D", "answer"),
                    "以下是中国关于{name}的单项选择题，请选出其中的正确答案。\n\n"),
    "cmmlu": Layout("cmmlu", "test", "{subject}.csv", ("Question", "A", "B", "C", "D", "Answer"),
                    "以下是关于{name}的单项选择题，请直接给出正确答案的选项。\n\n"),
}


@dataclass
class Question:
    subject: str
    where: str                  # file:line, for reports and errors
    question: str
    options: tuple[str, str, str, str]
    answer: str                 # "A" .. "D"

    def text(self) -> str:
        """The question as the harness's templates render it: stripped question, options, "答案："."""
        a, b, c, d = self.options
        return f"{self.question.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案："


@dataclass
class Benchmark:
    layout: Layout
    root: Path
    subjects: dict[str, dict[str, list[Question]]] = field(default_factory=dict)   # subject -> {"dev", "eval"}
    bad: list[str] = field(default_factory=list)                                   # "file:line: why"

    @property
    def n_questions(self) -> int:
        return sum(len(s["eval"]) for s in self.subjects.values())


def parse_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition(":")
    if not sep or name not in LAYOUTS or not path:
        raise UserError(f"--bench {spec!r}: expected NAME:DIR with NAME one of {', '.join(LAYOUTS)} "
                        f"(e.g. --bench ceval:data/ceval-exam)")
    return name, Path(path).expanduser()


def _read_split(path: Path, layout: Layout, subject: str, bad: list[str]) -> list[Question]:
    out = []
    try:
        fh = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with fh:
        rows = csv.reader(fh)
        try:
            header = next(rows)
        except (StopIteration, UnicodeDecodeError, csv.Error):
            bad.append(f"{path}:1: no CSV header")
            return out
        cols = [h.strip() for h in header]
        missing = [c for c in layout.columns if c not in cols]
        if missing:
            raise UserError(f"{path}: no column {', '.join(missing)} (its header: {','.join(cols)}); a {layout.name} "
                            f"file has {','.join(layout.columns)}")
        idx = [cols.index(c) for c in layout.columns]
        try:
            for line, row in enumerate(rows, 2):
                where = f"{path}:{line}"
                if not any(x.strip() for x in row):
                    continue
                if len(row) < len(cols):
                    bad.append(f"{where}: {len(row)} fields, the header has {len(cols)}")
                    continue
                q, a, b, c, d, ans = (row[i] for i in idx)
                ans = ans.strip().upper()
                if ans not in LETTERS:
                    bad.append(f"{where}: answer {ans!r} is not one of A, B, C, D")
                    continue
                out.append(Question(subject, where, q, (a, b, c, d), ans))
        except (UnicodeDecodeError, csv.Error) as e:
            bad.append(f"{path}: unreadable from row {line} on ({type(e).__name__}: {str(e)[:80]}); save it as UTF-8 CSV")
    return out


def read_benchmark(name: str, root: Path) -> Benchmark:
    """Every subject that has both a dev file (its examples) and a scored file, in name order. A row that
    cannot be a question is counted in `bad` with its file and line; a wrong header stops with what is there."""
    layout = LAYOUTS[name]
    root = Path(root)
    scored_dir, dev_dir = root / layout.scored, root / "dev"
    if not scored_dir.is_dir():
        raise UserError(f"{root}: no {layout.scored}/ folder; a {name} folder holds dev/ and {layout.scored}/ with one "
                        f"CSV per subject (as the benchmark publishes it)")
    pattern = re.compile("^" + re.escape(layout.file).replace(r"\{subject\}", "(.+)").replace(
        r"\{split\}", re.escape(layout.scored)) + "$")
    bench = Benchmark(layout, root)
    for path in sorted(scored_dir.glob("*.csv")):
        m = pattern.match(path.name)
        if not m:
            bench.bad.append(f"{path}: not a {name} file name ({layout.file.format(subject='SUBJECT', split=layout.scored)})")
            continue
        subject = m.group(1)
        dev = dev_dir / layout.file.format(subject=subject, split="dev")
        bench.subjects[subject] = {"eval": _read_split(path, layout, subject, bench.bad),
                                   "dev": _read_split(dev, layout, subject, bench.bad) if dev.exists() else []}
    if not bench.subjects:
        raise UserError(f"{scored_dir}: no {layout.file.format(subject='SUBJECT', split=layout.scored)} files")
    return bench


def subject_name(name: str, subject: str, root: Path) -> str:
    """The subject's Chinese name, as the benchmark publishes it (C-Eval's subject_mapping.json where the folder
    has one), else its file name with spaces."""
    mapping = Path(root) / "subject_mapping.json"
    if mapping.exists():
        try:
            got = json.loads(mapping.read_text(encoding="utf-8")).get(subject)
            if isinstance(got, list) and len(got) > 1:
                return str(got[1])
        except (OSError, ValueError):
            pass
    return SUBJECT_NAMES.get(name, {}).get(subject, subject.replace("_", " "))


def prompt(bench: Benchmark, q: Question, shots: int) -> str:
    """description + k solved dev examples ("question 答案： X" and a blank line each) + the question."""
    desc = bench.layout.description.format(name=subject_name(bench.layout.name, q.subject, bench.root))
    examples = "".join(f"{d.text()} {d.answer}\n\n" for d in bench.subjects[q.subject]["dev"][:shots])
    return desc + examples + q.text()


def encode_choices(tok, context: str, continuations, max_len: int) -> list[tuple[list[int], int, bool]]:
    """Per continuation: (input ids, how many of the last positions are the continuation's, whether the start
    was cut off), as the harness encodes a log-likelihood request: the whole string encoded and the context's
    own tokens cut off (BPE may merge across the boundary), trailing spaces of the context moved to the
    continuation, the sequence cut from the left to the model's context + 1. The context is encoded once."""
    n = len(context) - len(context.rstrip())
    head, tail = (context[:-n], context[-n:]) if n else (context, "")
    n_context = len(tok.encode(head))
    out = []
    for cont in continuations:
        whole = tok.encode(head + tail + cont)
        ids = whole[-(max_len + 1):]
        out.append((ids, min(len(whole) - n_context, len(ids) - 1), len(whole) > len(ids)))
    return out


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], int]], pad_id: int, batch_size: int = 16,
                   desc: str = "log-likelihoods") -> list[float]:
    """Sum of log p(continuation | context) for each (ids, n_cont). Requests with the same input (the four
    letters after one question: the input is the context, the continuation one token) share one forward
    pass, as the harness groups them; inputs right-padded, longest first."""
    device = next(model.parameters()).device
    by_input: dict[tuple, list[int]] = {}
    for i, (ids, _) in enumerate(requests):
        by_input.setdefault(tuple(ids[:-1]), []).append(i)
    inputs = sorted(by_input, key=len, reverse=True)
    out = [0.0] * len(requests)
    bar = progress(total=len(requests), desc=desc, unit="choice")
    for s in range(0, len(inputs), batch_size):
        part = inputs[s:s + batch_size]
        inp = torch.full((len(part), len(part[0])), pad_id, dtype=torch.long)
        for r, x in enumerate(part):
            inp[r, :len(x)] = torch.tensor(x)
        hidden = model(inp.to(device), return_hidden=True)
        for r, x in enumerate(part):           # the vocabulary's logits only where a continuation is
            L = len(x)
            for i in by_input[x]:
                ids, n = requests[i]
                logp = F.log_softmax(model.logits(hidden[r, L - n:L]).float(), dim=-1)
                out[i] = logp.gather(-1, torch.tensor(ids[-n:], device=device)[:, None]).sum().item()
            bar.update(len(by_input[x]))
    bar.close()
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n (Wilson 1927): right at 0 and 1 and for small n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    return (max(0.0, mid - half), min(1.0, mid + half))


def picked_line(result: dict) -> str:
    """"A / B / C / D" counts of the letters a model answered (a model that always says one letter scores that
    letter's share), from a score_benchmark result."""
    picked = result.get("picked") or {x: sum(q["pred"] == x for q in result.get("questions", [])) for x in LETTERS}
    return " / ".join(f"{picked.get(x, 0):,}" for x in LETTERS)


TABLE_HEADER = ["stage", "accuracy [95 % CI]", "subject mean", "correct", "above chance", "answered A / B / C / D"]


def table_row(stage: str, r: dict) -> list:
    """A stage's result as the eval command's table and the report show it (TABLE_HEADER)."""
    return [stage, f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", f"{r['subject_mean']:.3f}",
            f"{r['correct']:,} / {r['n']:,}", "yes" if r["above_chance"] else "no", picked_line(r)]


def score_benchmark(model, tok, bench: Benchmark, shots: int, batch_size: int = 16, desc: str = "") -> dict:
    """Accuracy per subject and overall (questions pooled, and the mean of the subjects' accuracies, as
    C-Eval's leaderboard averages), beside the chance level, with each question's four log-likelihoods."""
    max_len = model.config.max_position_embeddings
    questions = [q for s in bench.subjects.values() for q in s["eval"]]
    requests, truncated = [], 0
    for q in questions:
        choices = encode_choices(tok, prompt(bench, q, shots), [" " + x for x in LETTERS], max_len)
        requests += [(ids, n) for ids, n, _ in choices]
        truncated += any(cut for _, _, cut in choices)
    lls = loglikelihoods(model, requests, tok.pad_id, batch_size, desc=desc or bench.layout.name)
    per_subject: dict[str, dict] = {}
    rows = []
    for i, q in enumerate(questions):
        ll = lls[4 * i:4 * i + 4]
        pred = LETTERS[max(range(4), key=lambda j: (ll[j], -j))]      # ties: the first, as argmax
        ok = pred == q.answer
        s = per_subject.setdefault(q.subject, {"n": 0, "correct": 0})
        s["n"] += 1
        s["correct"] += ok
        rows.append({"where": q.where, "answer": q.answer, "pred": pred, "loglik": [round(x, 5) for x in ll]})
    for s in per_subject.values():
        s["accuracy"] = s["correct"] / s["n"]
    n, k = len(questions), sum(s["correct"] for s in per_subject.values())
    lo, hi = wilson(k, n)
    picked = {x: sum(r["pred"] == x for r in rows) for x in LETTERS}    # a model that always says "C" shows here
    return {"n": n, "correct": k, "accuracy": k / n if n else 0.0, "ci95": [lo, hi], "chance": CHANCE, "picked": picked,
            "above_chance": lo > CHANCE, "subject_mean": sum(s["accuracy"] for s in per_subject.values())
            / max(1, len(per_subject)), "truncated_prompts": truncated, "subjects": per_subject, "questions": rows}
