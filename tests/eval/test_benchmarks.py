"""`zero-chatgpt eval --bench ceval:DIR / cmmlu:DIR` on small sets written here in each benchmark's published
CSV layout, checked question by question against lm-evaluation-harness run on the HF export of the same model
with a local task over the same files: the same prompts, the same log-likelihoods, the same accuracy."""
from __future__ import annotations

import csv
import itertools
import json
import random

import pytest
import torch

from runs import record_stage
from test_config_cli import _cli_error
from zero_chatgpt.cli import main
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.data.builtin import iter_peoples_daily, load_idioms
from zero_chatgpt.eval import benchmarks
from zero_chatgpt.export.hf import export_hf
from zero_chatgpt.model.tokenizer import load_tokenizer, train_bpe
from zero_chatgpt.model.transformer import ModelConfig, Transformer

SUBJECTS = {"ceval": ("high_school_chinese", "chinese_language_and_literature"), "cmmlu": ("chinese_literature",
                                                                                             "elementary_chinese")}
SHOTS = 2


def _questions(rng: random.Random, idioms: list[dict], n: int) -> list[dict]:
    """Idiom-meaning questions: the right explanation and three others, in a random order."""
    out = []
    for d in rng.sample(idioms, n):
        wrong = [x["explanation"] for x in rng.sample(idioms, 3)]
        opts = [d["explanation"]] + wrong
        rng.shuffle(opts)
        out.append({"question": f"  「{d['word']}」的意思是： ", "options": opts,
                    "answer": "ABCD"[opts.index(d["explanation"])]})
    # what a CSV reader must get right: a comma and a double quote inside a field, a line break in a question
    out[0]["options"][1] = '他说:"好,就这样。"'
    out[1]["question"] = "下面哪一项\n解释了「画蛇添足」？"
    return out


def write_sets(root, rng) -> dict:
    idioms = [d for d in load_idioms() if 8 <= len(d["explanation"]) <= 60][:3000]
    dirs = {}
    for name, subjects in SUBJECTS.items():
        layout = benchmarks.LAYOUTS[name]
        base = root / name
        for subject in subjects:
            for split, n in (("dev", 5), (layout.scored, 12)):
                (base / split).mkdir(parents=True, exist_ok=True)
                path = base / split / layout.file.format(subject=subject, split=split)
                with open(path, "w", encoding="utf-8", newline="") as fh:
                    w = csv.writer(fh)
                    head = ["id", *layout.columns] if name == "ceval" else ["", *layout.columns]
                    w.writerow(head + (["explanation"] if name == "ceval" and split == "dev" else []))
                    for i, q in enumerate(_questions(rng, idioms, n)):
                        w.writerow([i, q["question"], *q["options"], q["answer"]]
                                   + (["见词典"] if name == "ceval" and split == "dev" else []))
        dirs[name] = base
    return dirs


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A run directory with a (random, tiny) pretrained model, the two sets, and `eval --bench` run on them."""
    root = tmp_path_factory.mktemp("bench")
    rd = root / "run"
    docs = [a["text"] for a in itertools.islice(iter_peoples_daily(), 200)]
    tok = train_bpe(docs, 700)
    tok.save(rd / "tokenizer")
    tok = load_tokenizer(rd / "tokenizer")
    record_stage(rd, "tokenizer")
    torch.manual_seed(0)
    # a short context, so that some 2-shot prompts are cut from the left (as the harness cuts them)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=96,
                                    eos_token_id=tok.eot_id))
    with torch.no_grad():
        for p in model.parameters():      # a model with opinions: the letters' log-likelihoods differ
            p.add_(0.05 * torch.randn_like(p))
    ckpt.save_checkpoint(rd / "pretrain", "final", model_state=model.state_dict(), cfg=model.config)
    record_stage(rd, "pretrain", reads=["tokenizer"])
    sets = write_sets(root / "sets", random.Random(7))
    args = ["eval", "--run-dir", str(rd), "--bench", f"ceval:{sets['ceval']}", "--bench", f"cmmlu:{sets['cmmlu']}",
            "--shots", str(SHOTS)]
    assert main(args) in (0, None)
    return rd, sets, tok, args


def test_bench_reads_every_question_and_reports_accuracy_beside_chance(scored):
    rd, sets, tok, _ = scored
    for name in SUBJECTS:
        res = json.loads((rd / "eval" / f"bench_{name}.json").read_text())
        assert res["questions"] == 24 and res["subjects"] == 2 and res["bad_rows"] == 0 and res["shots"] == SHOTS
        r = res["stages"]["pretrain"]
        assert r["n"] == 24 and 0 <= r["correct"] <= 24 and r["chance"] == 0.25
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert set(r["subjects"]) == set(SUBJECTS[name]) and sum(s["n"] for s in r["subjects"].values()) == 24
        assert r["truncated_prompts"] > 0                         # the 96-token context cut some prompts
        assert all(len(q["loglik"]) == 4 and q["pred"] == "ABCD"[max(range(4), key=lambda j: q["loglik"][j])]
                   for q in r["questions"])
    # the prompt: description with the subject's Chinese name, the shots, the stripped question, "答案："
    bench = benchmarks.read_benchmark("cmmlu", sets["cmmlu"])
    q = bench.subjects["elementary_chinese"]["eval"][2]
    p = benchmarks.prompt(bench, q, SHOTS)
    assert p.startswith("以下是关于小学语文的单项选择题，请直接给出正确答案的选项。\n\n") and p.endswith("\nD. " + q.options[3] + "\n答案：")
    assert p.count("答案：") == SHOTS + 1 and "  「" not in p


def test_a_second_run_reuses_the_scores_and_bad_rows_are_counted_with_where(scored, tmp_path, capsys):
    rd, sets, _, args = scored
    before = (rd / "eval" / "bench_ceval.json").read_text()
    main(args)
    assert "up to date" in capsys.readouterr().err and (rd / "eval" / "bench_ceval.json").read_text() == before
    bad = tmp_path / "bad"
    (bad / "val").mkdir(parents=True)
    (bad / "dev").mkdir()
    (bad / "val" / "art_studies_val.csv").write_text("id,question,A,B,C,D,answer\n0,问,甲,乙,丙,丁,E\n1,问,甲,乙\n"
                                                     "2,问题,甲,乙,丙,丁,b\n", encoding="utf-8")
    b = benchmarks.read_benchmark("ceval", bad)
    assert [q.answer for q in b.subjects["art_studies"]["eval"]] == ["B"]
    assert len(b.bad) == 2 and "art_studies_val.csv:2: answer 'E'" in b.bad[0] and "art_studies_val.csv:3:" in b.bad[1]
    (bad / "val" / "x_val.csv").write_text("q,a\n", encoding="utf-8")
    err = _cli_error(capsys, "eval", "--run-dir", rd, "--bench", f"ceval:{bad}")
    assert "x_val.csv: no column question, A, B, C, D, answer" in err
    err = _cli_error(capsys, "eval", "--run-dir", rd, "--bench", f"mmlu:{bad}")
    assert "expected NAME:DIR with NAME one of ceval, cmmlu" in err


def _task_yaml(name: str, subject: str, folder, layout) -> str:
    files = {"dev": str(folder / "dev" / layout.file.format(subject=subject, split="dev")),
             layout.scored: str(folder / layout.scored / layout.file.format(subject=subject, split=layout.scored))}
    desc = layout.description.format(name=benchmarks.SUBJECT_NAMES[name][subject])
    q, a, b, c, d, ans = layout.columns
    return "\n".join([
        f"task: zc_{name}_{subject}", "dataset_path: csv",
        "dataset_kwargs:", "  data_files:", *[f"    {k}: {json.dumps(v)}" for k, v in files.items()],
        f"{'validation' if layout.scored == 'val' else 'test'}_split: {layout.scored}", "fewshot_split: dev",
        "fewshot_config:", "  sampler: first_n", "output_type: multiple_choice",
        f"description: {json.dumps(desc, ensure_ascii=False)}",
        "doc_to_text: " + json.dumps(f"{{{{{q}.strip()}}}}\nA. {{{{{a}}}}}\nB. {{{{{b}}}}}\nC. {{{{{c}}}}}\nD. "
                                     f"{{{{{d}}}}}\n答案：", ensure_ascii=False),
        'doc_to_choice: ["A", "B", "C", "D"]', f"doc_to_target: \"{{{{['A', 'B', 'C', 'D'].index({ans})}}}}\"",
        "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true", ""])


@pytest.mark.slow
def test_per_question_log_likelihoods_and_accuracy_equal_lm_evaluation_harness(scored, tmp_path, monkeypatch):
    for k, v in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "HF_DATASETS_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager
    rd, sets, tok, _ = scored
    hf = export_hf(rd / "pretrain" / "final", rd / "tokenizer", tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    names = []
    for name, subjects in SUBJECTS.items():
        for subject in subjects:
            (tasks / f"zc_{name}_{subject}.yaml").write_text(
                _task_yaml(name, subject, sets[name], benchmarks.LAYOUTS[name]), encoding="utf-8")
            names.append(f"zc_{name}_{subject}")
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32,device=cpu", tasks=names,
                                  num_fewshot=SHOTS, batch_size=8, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tasks)))
    checked = 0
    for name, subjects in SUBJECTS.items():
        ours = json.loads((rd / "eval" / f"bench_{name}.json").read_text())["stages"]["pretrain"]
        bench = benchmarks.read_benchmark(name, sets[name])
        for subject in subjects:
            task = f"zc_{name}_{subject}"
            theirs = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            mine = [q for q in ours["questions"] if f"/{subject}_" in q["where"] or f"/{subject}.csv" in q["where"]]
            qs = bench.subjects[subject]["eval"]
            assert len(theirs) == len(mine) == len(qs) == 12
            for t, m, q in zip(theirs, mine, qs):
                ctx = t["arguments"][0][0] if isinstance(t["arguments"][0], (list, tuple)) else t["arguments"]["gen_args_0"]["arg_0"]
                assert ctx == benchmarks.prompt(bench, q, SHOTS), task                      # the same prompt
                lls = [float(r[0]) for r in t["filtered_resps"]]
                assert max(abs(a - b) for a, b in zip(lls, m["loglik"])) < 2e-4, (task, lls, m["loglik"])
                assert (m["pred"] == q.answer) == bool(t["acc"])
                checked += 1
            acc = out["results"][task]["acc,none"]
            assert abs(acc - ours["subjects"][subject]["accuracy"]) < 1e-9
    assert checked == 48


def test_the_report_shows_the_benchmarks(scored):
    rd = scored[0]
    assert main(["report", "--run-dir", str(rd)]) in (0, None)
    md = (rd / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Standard benchmarks" in md
    for name in SUBJECTS:
        res = json.loads((rd / "eval" / f"bench_{name}.json").read_text())["stages"]["pretrain"]
        assert f"{name}: 24 questions in 2 subjects" in md and f"{res['correct']:,} / 24" in md
