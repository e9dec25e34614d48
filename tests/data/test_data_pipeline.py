"""The data stage end to end: accounting, outputs, resume after a kill, CLI, built-in corpus."""
import itertools
import pytest
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from zero_chatgpt.core import config
from zero_chatgpt.core.io import corpus_shards, iter_corpus_texts, iter_jsonl
from zero_chatgpt.core.rundir import Context, RunDir
from zero_chatgpt.data.builtin import iter_reviews
from zero_chatgpt.stages.data import run_stage

FIX = Path(__file__).parents[1] / "fixtures" / "data"
ENV = {**os.environ, "ZC_NO_PROGRESS": "1"}


def reviews(n, start=0):
    seen, out = set(), []
    for r in itertools.islice(iter_reviews(), start, None):
        t = r["text"]
        if len(t) >= 60 and t not in seen:
            seen.add(t)
            out.append(t)
            if len(out) == n:
                return out
    return out


def ctx_for(run_dir, *overrides, sources=()):
    cfg = config.resolve(Path(run_dir), "demo", list(overrides))
    cfg.data.sources = list(sources)
    return Context(run_dir=RunDir(run_dir), cfg=cfg)


def check_invariant(stats):
    assert stats["docs_in"] == stats["docs_out"] + sum(stats["dropped"].values()) + stats["bad_records"]["count"]


def test_accounting_outputs_and_bad_records(tmp_path):
    texts = reviews(300)
    rng = random.Random(0)
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    lines += [json.dumps({"text": texts[i]}, ensure_ascii=False) for i in range(20)]          # 20 exact copies
    near = [texts[i][:-3] + "，真的。" for i in range(20, 40)]                                   # 20 near copies
    lines += [json.dumps({"text": t}, ensure_ascii=False) for t in near]
    lines += ['{"text": "broken', '{"title": "no text field"}', json.dumps({"text": "太短了"}, ensure_ascii=False)]
    rng.shuffle(lines[300:])
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("")
    run = tmp_path / "run"
    ctx = ctx_for(run, "data.shard_docs=64", "data.val_fraction=0.1",
                  sources=[f"jsonl:{src}", f"jsonl:{tmp_path / 'empty.jsonl'}",
                           f"wikipedia-cn:{FIX / 'wikipedia-cn.json'}", f"baidubaike:{FIX / 'baidubaike.jsonl'}"])
    stats = run_stage(ctx)
    check_invariant(stats)
    assert stats["docs_in"] == len(lines) + 1 + 3 + 3  # + the empty file, counted as one bad record
    assert stats["bad_records"]["count"] == 3
    wheres = [s["where"] for s in stats["bad_records"]["samples"]]
    assert any(w.endswith("in.jsonl:" + str(lines.index('{"text": "broken') + 1)) for w in wheres)
    assert any(w.endswith("empty.jsonl:0") for w in wheres)
    d = stats["dropped"]
    assert d["exact_dup"] >= 20 and d["near_dup"] >= 15 and d["baike_section"] == 1 and d["too_short"] >= 1
    # outputs: what the shards hold is what stats say, in both splits
    train, val = list(iter_corpus_texts(run / "data", "train")), list(iter_corpus_texts(run / "data", "val"))
    assert len(train) == stats["train_docs"] and len(val) == stats["val_docs"] > 0
    assert len(train) + len(val) == stats["docs_out"] and len(set(train + val)) == stats["docs_out"]
    assert sum(map(len, train + val)) == stats["chars_out"]
    assert not set(near) & set(train + val) or len(set(near) & set(train + val)) <= 5
    rec = next(iter_jsonl(corpus_shards(run / "data", "train")[0]))
    assert {"text", "source", "where"} <= set(rec)
    assert json.loads((run / "data" / "stats.json").read_text()) == stats
    assert not (run / "data" / "work").exists()
    # unchanged inputs and config: the stage skips itself; a config change reruns it
    again = run_stage(ctx_for(run, "data.shard_docs=64", "data.val_fraction=0.1", sources=ctx.cfg.data.sources))
    assert again == stats
    rerun = run_stage(ctx_for(run, "data.shard_docs=64", "data.val_fraction=0.1", "data.near_dedup=false",
                              sources=ctx.cfg.data.sources))
    check_invariant(rerun)
    assert rerun["dropped"]["near_dup"] == 0 and rerun["docs_out"] > stats["docs_out"]


def _cli(run_dir, *args, **kw):
    return subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "data", "--run-dir", str(run_dir), *args],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    texts = reviews(6000)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts * 2), encoding="utf-8")
    args = ["--source", f"jsonl:{src}", "--set", "data.shard_docs=300", "--set", "data.workers=1"]
    killed = tmp_path / "killed"
    p = _cli(killed, *args)
    work = killed / "data" / "work"
    deadline = time.time() + 60
    while len(list(work.glob("part-*.json"))) < 3 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    finished = len(list(work.glob("part-*.json")))
    assert finished >= 3 and not (killed / "data" / "stats.json").exists()

    p = _cli(killed, *args)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "resumed" in err
    stats = json.loads((killed / "data" / "stats.json").read_text())
    check_invariant(stats)
    assert len(stats["resumed_parts"]) >= finished - 1 and stats["docs_in"] == 2 * len(texts)
    assert stats["dropped"]["exact_dup"] >= 0.9 * len(texts) and stats["docs_out"] <= len(texts)

    fresh = tmp_path / "fresh"
    p = _cli(fresh, *args)
    p.communicate(timeout=120)
    assert p.returncode == 0
    for split in ("train", "val"):
        assert list(iter_corpus_texts(killed / "data", split)) == list(iter_corpus_texts(fresh / "data", split))


def test_cli_source_and_errors(tmp_path):
    p = _cli(tmp_path / "r", "--source", f"skypile:{FIX / 'skypile'}", "--source",
             f"wikipedia-cn:{FIX / 'wikipedia-cn.json'}")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "data: 6 documents in → 6 out" in err and "kept" in err  # the funnel table
    p = _cli(tmp_path / "r2", "--source", f"csv:{tmp_path}")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.strip().count("\n") == 0 and "wikipedia-cn" in err
    p = _cli(tmp_path / "r3", "--source", f"firefly:{FIX / 'firefly.jsonl'}")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "chat format" in err


def test_builtin_corpus(tmp_path):
    stats = run_stage(ctx_for(tmp_path, 'data.builtin_parts=["peoples-daily"]'))
    check_invariant(stats)
    assert stats["docs_in"] > 2500 and stats["docs_out"] > 2500
    assert set(stats["by_source"]) == {"peoples-daily"}
    text = next(iter_corpus_texts(tmp_path / "data", "train"))
    assert "/" not in text[:50] and "１" not in text  # tags stripped, full-width digits normalized
