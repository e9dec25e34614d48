"""`zero-chatgpt eval`: every trained stage on the same held-out prompts, merged into eval/<stage>.json."""
import json

import pytest
import torch

from runs import record_stage
from test_sft import _tiny_model, toy_run_copy
from zero_chatgpt import checkpoint as ckpt
from zero_chatgpt import config
from zero_chatgpt import evaluate as ev
from zero_chatgpt.console import UserError
from zero_chatgpt.data import chat_data
from zero_chatgpt.data.builtin import load_idioms
from zero_chatgpt.rundir import Context, RunDir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_run")
    tok = toy_run_copy(root, tmp_path_factory)                                   # tokenizer/ + sft/final
    pre = _tiny_model(tok)                                     # pretrain/final: an untrained model
    ckpt.save_checkpoint(root / "pretrain", "final", model_state=pre.state_dict(), cfg=pre.config)
    record_stage(root, "pretrain", reads=["tokenizer"])
    (root / "eval").mkdir()
    (root / "eval" / "pretrain.json").write_text(json.dumps(   # what the pretrain stage writes
        {"val_loss": 3.5, "val_bpc": 2.0, "curve": [{"step": 1, "val_loss": 3.5, "val_bpc": 2.0}],
         "samples": [{"prompt": "中国", "text": "中国人"}]}))
    data = chat_data.build_builtin(load_idioms()[:3000], seed=1)
    chat_data.write_splits(data, root / "sft_data")
    yield root
    torch.set_num_threads(n)


def _ctx(root, *overrides, **args):
    cfg = config.load_preset("demo")
    cfg = config.apply_overrides(cfg, ["eval.num_prompts=10", "eval.max_new_tokens=6", "eval.batch_size=4",
                                       "eval.val_samples=8", "eval.num_samples=3", *overrides])
    return Context(run_dir=RunDir(root), cfg=cfg, args=args)


def test_eval_writes_every_stage_and_keeps_pretrain_keys(run, capsys):
    ev.run_stage(_ctx(run))
    pre = json.loads((run / "eval" / "pretrain.json").read_text())
    sft = json.loads((run / "eval" / "sft.json").read_text())
    # the pretrain stage's keys survive; its samples are kept under another name beside ours
    assert pre["val_loss"] == 3.5 and pre["curve"] and pre["pretrain_samples"][0]["prompt"] == "中国"
    for res in (pre, sft):
        for k in ("char_f1", "rouge_l", "eos_rate", "repetition_rate", "chat_val_loss", "samples",
                  "baseline_question_char_f1", "baseline_question_rouge_l", "by_kind", "truncated_answers"):
            assert k in res, k
        assert res["n_prompts"] == 10 and len(res["samples"]) == 3
        assert {"question", "answer", "reference"} <= set(res["samples"][0])
        assert 0 <= res["char_f1"] <= 1 and 0 <= res["eos_rate"] <= 1
    assert sft["val_loss"] == sft["chat_val_loss"]
    assert sft["decoding"] == {"greedy": True, "repetition_penalty": 1.0, "max_new_tokens": 6}
    assert "plain_greedy" not in sft
    assert pre["prompt_format"].startswith("plain text") and sft["prompt_format"] == "chat template"
    # the same prompts for both stages
    assert [s["question"] for s in pre["samples"]] == [s["question"] for s in sft["samples"]]
    # with 6 new tokens, most answers hit the limit: counted, and they count against eos_rate
    assert sft["truncated_answers"] + round(sft["eos_rate"] * 10) == 10
    out = capsys.readouterr().err
    assert "char_f1" in out and "question-as-answer" in out
    # a second run is up to date
    ev.run_stage(_ctx(run))
    assert "up to date" in capsys.readouterr().err


def test_eval_with_a_repetition_penalty_reports_plain_greedy_beside(run, capsys):
    ev.run_stage(_ctx(run, "eval.repetition_penalty=1.3", stage="sft"))
    sft = json.loads((run / "eval" / "sft.json").read_text())
    assert sft["decoding"]["repetition_penalty"] == 1.3
    assert set(sft["plain_greedy"]) == {"char_f1", "rouge_l", "eos_rate", "repetition_rate"}
    out = capsys.readouterr().err
    assert "repetition_rate (plain greedy)" in out and "repetition penalty 1.3" in out


def test_eval_stage_flag(run):
    with pytest.raises(UserError, match=r"no current ppo model.*zero-chatgpt ppo"):
        ev.run_stage(_ctx(run, stage="ppo"))
    with pytest.raises(UserError, match="unknown stage"):
        ev.run_stage(_ctx(run, stage="nonsense"))


def test_prompt_selection_covers_kinds():
    recs = [{"messages": [{"role": "user", "content": f"q{k}{i}"}], "reference": "r", "meta": {"kind": k}}
            for k in ("meaning", "pinyin", "chain") for i in range(10)]
    sel = ev.select_prompts(recs, 9, seed=1)
    assert sorted(r["meta"]["kind"] for r in sel) == ["chain"] * 3 + ["meaning"] * 3 + ["pinyin"] * 3
    assert sel == ev.select_prompts(recs, 9, seed=1) and len(ev.select_prompts(recs, 100, 1)) == 30
    base = ev.question_baseline([{"messages": [{"role": "user", "content": "甲乙"}], "reference": "甲乙",
                                  "meta": {"kind": "meaning"}}])
    assert base["baseline_question_char_f1"] == 1.0
