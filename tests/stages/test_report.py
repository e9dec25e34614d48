"""`zero-chatgpt report` and the stage timings: the card of a partial run (data, tokenizer, pretrain: a real tiny
run) and of a whole one (the same run with the later stages' outputs written as their stages write them, the
eval figures through eval/metrics.py's own scoring); one self-contained HTML page whose every image is a PNG
data: URI that decodes, no plot text a font lacks, timings merged by every command; in a real browser, nothing
fetched but the file itself, every image drawn."""
import base64
import contextlib
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

from runs import record_stage, skip_unless_ci, tiny_args, write_sources, zc
from zero_chatgpt import cli
from zero_chatgpt.report import plots
from zero_chatgpt.stages import eval as ev
from zero_chatgpt.core.console import format_cell
from zero_chatgpt.core.rundir import RunDir

SECTIONS = ("Data", "Tokenizer", "Training curves", "Reward model", "Alignment: reward, gold char_f1, KL",
            "The model after every stage", "Run")
IMG = re.compile(r"<img [^>]*src=\"([^\"]*)\"")
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    corpus, _ = write_sources(root / "src")
    r = zc("run", "--run-dir", root / "run", "--until", "pretrain",
           *tiny_args(**{"pretrain.samples": 2, "pretrain.sample_tokens": 8}), "--set", f'data.sources=["jsonl:{corpus}"]')
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", r.stderr


def _timings(rd) -> dict:
    return json.loads((rd / "report" / "timings.json").read_text())


@contextlib.contextmanager
def glyphs_missing_are_errors():
    """Matplotlib's "Glyph 25968 (...) missing from font(s) DejaVu Sans." as an error: a plot drawing text its
    font lacks fails instead of showing boxes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Glyph")
        warnings.filterwarnings("error", message=r".*missing from (current )?font")
        yield


def check_page(html_path: Path) -> str:
    """The page's text, after checking it is self-contained and every image is a PNG data: URI that decodes."""
    from PIL import Image
    page = html_path.read_text(encoding="utf-8")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)""", page, re.I), "an external reference"
    assert "<script" not in page and "@import" not in page and "url(" not in page
    srcs = IMG.findall(page)
    assert srcs and len(srcs) == page.count("<img ")
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 50
    return page


@pytest.mark.slow
def test_run_records_timings_and_says_what_is_next(partial):
    rd, err = partial
    t = _timings(rd)
    assert list(t["stages"]) == ["data", "tokenizer", "pretrain"]
    assert all(e["seconds"] > 0 and e["action"] == "start" for e in t["stages"].values())
    assert t["total_s"] == pytest.approx(sum(e["seconds"] for e in t["stages"].values()), abs=0.02)
    m = next(iter(t["machines"].values()))
    assert m["cores"] >= 1 and m["cpu"] and m["python"] and m["zero_chatgpt"] and "gpu" in m
    assert f"make it with `zero-chatgpt report --run-dir {rd}`" in err
    assert "chat, serve: need an SFT model" in err


@pytest.mark.slow
def test_the_card_of_a_partial_run_says_what_is_not_run(partial, tmp_path):
    rd = tmp_path / "run"
    shutil.copytree(partial[0], rd)
    before = _timings(rd)["stages"]
    # the plot text check in the subprocess: a glyph warning is an error there, and fails the command
    r = zc("report", "--run-dir", rd, env={"PYTHONWARNINGS": "error:Glyph"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"report: {rd / 'report' / 'report.html'}" in r.stderr and "documents kept" in r.stderr
    md = (rd / "report" / "report.md").read_text()
    page = check_page(rd / "report" / "report.html")
    for s in SECTIONS:
        assert f"## {s}" in md and f">{s}</h2>" in page, s
    for stage in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert f"not run: `zero-chatgpt {stage} --run-dir {rd}`" in md, stage
    assert "could not be drawn" not in md
    assert "vocabulary size | 512" in md and "characters per token" in md
    assert "the pretrained model continues" in md           # its samples, Chinese as text
    assert {p.name for p in (rd / "report" / "plots").glob("*.png")} == {"data_funnel.png", "loss_pretrain.png"}
    # the report's own time merged in; the others kept as the run wrote them
    t = _timings(rd)
    assert list(t["stages"]) == ["data", "tokenizer", "pretrain", "report"]
    assert {k: t["stages"][k] for k in before} == before
    # up to date: not drawn again
    r = zc("report", "--run-dir", rd)
    assert r.returncode == 0 and "report: up to date" in r.stderr
    assert _timings(rd)["stages"]["report"] == t["stages"]["report"]


def test_a_run_directory_with_nothing_in_it_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--run-dir", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nothing to report in" in err and "zero-chatgpt run --run-dir" in err


# ---------------------------------------------------------------- a whole run

def _eval_records(n=12):
    from zero_chatgpt.data.builtin import load_idioms
    idioms = [d for d in load_idioms()[:400] if d["explanation"] and d.get("pinyin")][:n]
    recs = []
    for i, d in enumerate(idioms):
        kind = ("meaning", "pinyin", "chain")[i % 3]
        q = {"meaning": f"“{d['word']}”是什么意思？", "pinyin": f"“{d['word']}”怎么读？",
             "chain": f"成语接龙：{d['word']}"}[kind]
        ref = {"meaning": d["explanation"][:40], "pinyin": d["pinyin"], "chain": ""}[kind]
        recs.append({"messages": [{"role": "user", "content": q}], "reference": ref,
                     "meta": {"kind": kind, "idiom": d["word"], "first_char": d["word"][-1], "source": "builtin"}})
    return recs


def _write_eval(rd, recs, stage, answers, sft=None):
    """eval/<stage>.json as stages/eval.py's evaluate_stage writes it, from these answers (evaluate's own scoring)."""
    kinds = [r["meta"]["kind"] for r in recs]
    ids = [ev.prompt_id(r) for r in recs]
    values = ev.per_prompt_values(recs, answers, [i % 4 != 0 for i in range(len(recs))], {"一心一意"},
                                  [len(a) for a in answers])
    if sft is not None:
        values["kl_to_sft"] = [0.01 * (i % 5) for i in range(len(recs))] if stage != "pretrain" else None
        values["win_rate_vs_sft"] = [(0.0, 0.5, 1.0)[i % 3] for i in range(len(recs))] if stage != "pretrain" else None
        values = {k: v for k, v in values.items() if v is not None}
    elif stage == "sft":
        values["kl_to_sft"] = [0.0] * len(recs)
    res = ev.aggregate(kinds, values)
    res.update(n_prompts=len(recs), n_scored=len(recs), chat_val_loss=4.2 if stage != "pretrain" else 6.1,
               decoding={"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": 32},
               samples=[{"id": ids[i], "kind": kinds[i], "question": ev.question_of(recs[i]), "answer": answers[i],
                         "reference": recs[i]["reference"], "eos": i % 4 != 0, "char_f1": values["char_f1"][i]}
                        for i in range(4)],
               per_prompt={"ids": ids, "kind": kinds, **values, "answer": answers},
               prompt_set={"part": "test", "gold_fraction": 0.2, "test_prompts": 40, "gold_prompts": 10, "seed": 1},
               **ev.question_baseline(recs))
    if stage != "pretrain":               # the chat stages' everyday answers: SFT's in kind, the others canned
        from zero_chatgpt.eval import everyday as ed
        every = ed.everyday_records()
        res.update(ed.judge(every, ["不客气，再见！你好，我是Zero-ChatGPT，可以解释成语。" if stage == "sft" else
                                    "我是Zero-ChatGPT，有什么可以帮你的吗？"] * len(every)))
    if sft is not None:
        res["vs_sft"] = ev.compare(kinds, ids, values, sft, 200, 1)
        if stage != "pretrain":
            res["vs_sft"].update(ed.compare(res, sft, 200, 1))
    path = rd / "eval" / f"{stage}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "samples" in old and "char_f1" not in old:
        old["pretrain_samples"] = old.pop("samples")
    ev.write_result(path, {**old, **res})
    return res


@pytest.fixture(scope="module")
def whole(partial, tmp_path_factory):
    """The partial run with every later stage's outputs: checkpoints (the pretrained weights, recorded as each
    stage would record them), logs, eval/<stage>.json, rm.json and the RL curves."""
    from zero_chatgpt.train import alignment
    from zero_chatgpt.train.train_log import TrainResult
    rd = tmp_path_factory.mktemp("whole") / "run"
    shutil.copytree(partial[0], rd)
    reads = {"sft": ["tokenizer", "pretrain"], "rm": ["sft"], "ppo": ["sft", "rm"], "dpo": ["sft", "rm"],
             "grpo": ["sft", "rm"]}
    for stage, up in reads.items():
        shutil.copytree(rd / "pretrain" / "final", rd / stage / "final")
        record_stage(rd, stage, reads=up)
    for stage, key in (("sft", "val_loss"), ("rm", "val_accuracy")):
        lines = [{"kind": "train", "step": s, "loss": 5.0 / s ** 0.3, "tokens": 256 * s} for s in range(1, 21)]
        lines += [{"kind": "eval", "step": s, key: 4.0 / s ** 0.2 if key == "val_loss" else 0.5 + s / 50}
                  for s in (5, 10, 20)]
        (rd / "logs" / f"{stage}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    for stage in ("ppo", "dpo", "grpo"):
        gold = [{"step": s, "gold_char_f1": 0.2 + 0.01 * s} for s in (0, 4, 8)]
        res = TrainResult(step=8, final=None, last_loss=0.1, evals=gold, tokens=0, seconds=1.0,
                               precision="fp32", resumed_from=0, selected_step=4)
        steps = [{"step": s, "reward_margin": 0.1 * s, "reward_accuracy": 0.5 + s / 20} if stage == "dpo" else
                 {"step": s, "rollout": s, "reward": -1 + 0.2 * s, "kl": 0.05 * s} for s in range(1, 9)]
        alignment.write_curves(RunDir(rd), stage, res, steps)
    (rd / "eval" / "rm.json").write_text(json.dumps(
        {"accuracy": 0.8, "val_pairs": 60, "probe_pass": {"cut": 1.0, "empty": 1.0, "other": 0.55, "refusal": 1.0,
                                                          "repeat": 0.85},
         "gold_agreement": 0.62, "gold_pairs": 40, "normalization": {"gain": 1.3, "bias": -0.2, "fitted_on": 50}}))
    recs = _eval_records()
    refs = [r["reference"] or "一心一意" for r in recs]
    sft = _write_eval(rd, recs, "sft", [x[: len(x) // 2] for x in refs])
    _write_eval(rd, recs, "pretrain", [ev.question_of(r) for r in recs], sft)
    for stage, cut in (("ppo", 1), ("dpo", 3), ("grpo", 2)):
        _write_eval(rd, recs, stage, [x[: max(1, len(x) * cut // 3)] for x in refs], sft)
    record_stage(rd, "eval", reads=["pretrain", "sft", "ppo", "dpo", "grpo", "rm"])
    return rd, sft


def test_the_card_of_a_whole_run(whole, capsys):
    rd, sft = whole
    with glyphs_missing_are_errors():
        cli.main(["report", "--run-dir", str(rd)])
    err = capsys.readouterr().err
    assert f"report: {rd / 'report' / 'report.html'}" in err and "5 models on 12 held-out prompts" in err
    md = (rd / "report" / "report.md").read_text()
    page = check_page(rd / "report" / "report.html")
    for s in (*SECTIONS, "Answers side by side"):
        assert f"## {s}" in md and f">{s}</h2>" in page, s
    assert "not run" not in md and "could not be drawn" not in md
    names = {"data_funnel", "loss_pretrain", "loss_sft", "loss_rm", "rl_ppo", "rl_dpo", "rl_grpo", "eval_metrics",
             "diff_vs_sft"}
    assert {p.stem for p in (rd / "report" / "plots").glob("*.png")} == names
    for p in (rd / "report" / "plots").glob("*.png"):       # the same bytes in the page and beside it
        assert f"(plots/{p.name})" in md and base64.b64encode(p.read_bytes()).decode() in page
    # the side-by-side figures and the paired differences are eval/metrics.py's, as it formats them
    ppo = json.loads((rd / "eval" / "ppo.json").read_text())
    assert ev.format_diff(ppo["vs_sft"]["char_f1"]) in md and ev.format_diff(ppo["vs_sft"]["kl_to_sft"]) in md
    row = next(x for x in md.splitlines() if x.startswith("| char_f1 |"))
    assert row.count("|") == 7 and f"| {format_cell(sft['char_f1'])} |" in row
    for m in ("char_f1", "rouge_l", "restates_idiom", "pinyin_exact", "pinyin_syllable_acc", "chain_valid", "eos_rate",
              "repetition_rate", "refusal_rate", "win_rate_vs_sft", "kl_to_sft"):
        assert f"| {m} |" in md, m
    # everyday questions: the share with its k/n, each category as k/n (9 questions), the paired difference
    n = sft["everyday"]["n"]
    assert f"| everyday_in_kind (k/n) | - | 1.000 ({n}/{n}) | 0.200 (9/{n}) |" in md
    assert "| everyday: thanks | - | 9/9 | 0/9 |" in md
    assert f"| everyday_in_kind | - | {ev.format_diff(ppo['vs_sft']['everyday_in_kind'])} |" in md
    # every stage's answer to the same questions, in Chinese, as text
    q = sft["samples"][0]
    assert f"{q['question']}</h3>" in page and page.count(">ppo</td>") >= 4
    assert "accuracy | 0.8" in md and "gold_agreement | 0.620 of 40 pairs" in md
    assert "| ppo | 8 | 4 | - |" in md


def test_run_ends_with_the_report_and_the_chat_and_serve_commands(whole, monkeypatch, capsys):
    rd, _ = whole
    before = _timings(rd)["stages"]
    from zero_chatgpt.core.registry import STAGES
    # the trained stages here were written by hand: walk the stages that check their own inputs, then the card
    monkeypatch.setattr(cli, "PIPELINE", tuple(STAGES[s] for s in ("data", "tokenizer", "pretrain", "report")))
    cli.main(["run", "--run-dir", str(rd)])
    err = capsys.readouterr().err
    assert f"report: {rd / 'report' / 'report.html'}" in err
    assert f"chat:   zero-chatgpt chat --run-dir {rd}" in err and f"serve:  zero-chatgpt serve --run-dir {rd}" in err
    t = _timings(rd)["stages"]
    for s in ("data", "tokenizer", "pretrain"):              # up to date: the time that built them is kept
        assert t[s] == before[s]


def test_plot_text_stays_in_the_font():
    """The check above would catch a glyph the font lacks; the plots escape such text instead of drawing it."""
    import matplotlib
    with matplotlib.rc_context({"font.family": "DejaVu Sans"}):
        fig = plots._figure(2, 1)
        fig.text(0.1, 0.5, "数据")
        with glyphs_missing_are_errors():
            with pytest.raises(UserWarning, match="missing from font"):
                plots._png(fig)
            png = plots.funnel([("读入", 10, "in"), ("kept", 4, "out")], "数据漏斗")
            png += plots.curves("曲线", [("损失", {"训练": [(1, 2.0), (2, 1.5), (3, 1.0)]})], mark=2, mark_label="最终")
    assert png.startswith(b"\x89PNG") and plots.label("读入 x") == "\\u8bfb\\u5165 x"


def test_the_page_in_a_browser_fetches_nothing_and_draws_every_image(whole):
    rd, _ = whole
    page = rd / "report" / "report.html"
    if not page.exists():
        cli.main(["report", "--run-dir", str(rd)])
    if not CHROMIUM.exists():
        skip_unless_ci("install chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    requests = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                          "--disable-background-networking", "--disable-component-update",
                                          "--disable-sync"])
        try:
            tab = browser.new_page()
            tab.on("request", lambda req: requests.append(req.url))
            tab.goto(page.as_uri(), wait_until="load")
            images = tab.evaluate("() => Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            title = tab.title()
            headings = tab.evaluate("() => Array.from(document.querySelectorAll('h2')).map(h => h.textContent)")
        finally:
            browser.close()
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    assert len(images) == 9 and all(done and width > 0 for done, width in images), images
    assert "report card" in title and "Answers side by side" in headings


def test_a_bad_log_line_is_skipped_and_named_and_small_figures_carry_their_n(whole, tmp_path, capsys):
    rd = tmp_path / "run"
    shutil.copytree(whole[0], rd)
    log = rd / "logs" / "sft.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"kind": "train", "step": 3, "loss": 1.0, "note": "caf\xe9"}\n'     # Latin-1, not UTF-8
    lines.insert(5, b'{"kind": "train", "st\n')                                        # cut mid-write
    log.write_bytes(b"".join(lines))
    rm = json.loads((rd / "eval" / "rm.json").read_text())
    rm.update(gold_agreement=1.0, gold_pairs=2, accuracy=0.75, val_pairs=12, pairs_by_negative={"cut": 3})
    (rd / "eval" / "rm.json").write_text(json.dumps(rm))
    cli.main(["report", "--run-dir", str(rd)])
    err = capsys.readouterr().err
    assert f"skipped 2 unreadable log line(s) ({log}:3: not UTF-8; {log}:6: not JSON)" in err
    md = (rd / "report" / "report.md").read_text()
    assert f"{log}:3: not UTF-8" in md and "could not be drawn" not in md and "loss_sft.png" in md
    # a share of fewer than 30 items is never shown without its n: the overview, the rm table, every probe
    assert "accuracy 0.750 (n=12), gold agreement 1.000 (n=2)" in md and "accuracy 0.750 (n=12), gold" in err
    assert "| gold_agreement | 1.000 (n=2) |" in md and "| accuracy | 0.750 (n=12) |" in md
    assert "| probe_pass: cut | 1.000 (n=3) |" in md and "| probe_pass: other | 0.550 (n unknown) |" in md
