"""`zero-chatgpt eval`: every trained stage on the same held-out prompts, merged into eval/<stage>.json."""
import json

import pytest
import torch
from test_sft import _tiny_model, toy_run_copy

from runs import record_stage
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import config
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.rundir import Context, RunDir
from zero_chatgpt.data import chat_data
from zero_chatgpt.data.builtin import load_idioms
from zero_chatgpt.eval import everyday, metrics, prompts
from zero_chatgpt.stages import eval as ev


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


@pytest.mark.slow
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
    # the new metrics, overall and per kind, and the per-prompt values behind them
    for k in ("refusal_rate", "mean_length", "mean_tokens", "pinyin_exact", "chain_valid"):
        assert k in sft and k in pre, k
    assert sft["kl_to_sft"] == 0.0 and "kl_to_sft" not in pre and "win_rate_vs_sft" not in sft   # no rm here
    pp = sft["per_prompt"]
    assert len(pp["ids"]) == len(set(pp["ids"])) == 10 and pp["ids"] == pre["per_prompt"]["ids"]
    assert all(len(v) == 10 for v in pp.values())
    assert [x is None for x in pp["pinyin_exact"]] == [k != "pinyin" for k in pp["kind"]]
    assert sft["by_kind"]["pinyin"]["pinyin_exact"] == sft["pinyin_exact"]
    assert "pinyin_exact" not in sft["by_kind"]["meaning"]
    # pretrain is compared with SFT, prompt by prompt; SFT is not compared with itself
    assert "vs_sft" not in sft and set(pre["vs_sft"]) >= {"char_f1", "eos_rate", "refusal_rate", "mean_length"}
    d = pre["vs_sft"]["char_f1"]
    assert d["n"] == sft["n_scored"] and d["ci95"][0] <= d["diff"] <= d["ci95"][1]
    assert d["diff"] == pytest.approx(pre["char_f1"] - sft["char_f1"])
    assert pre["vs_sft"]["pinyin_exact"]["n"] == sft["by_kind"]["pinyin"]["n"]
    assert "difference to SFT" in out and "[" in out
    # restating the idiom and pinyin syllables: defined on their kinds only, reported and compared
    assert [x is None for x in pp["restates_idiom"]] == [k not in metrics.RESTATE_KINDS for k in pp["kind"]]
    assert [x is None for x in pp["pinyin_syllable_acc"]] == [k != "pinyin" for k in pp["kind"]]
    assert all(x == 1.0 for x, e in zip(pp["pinyin_syllable_acc"], pp["pinyin_exact"]) if e)
    for k in ("restates_idiom", "pinyin_syllable_acc"):
        assert k in sft and k in pre["vs_sft"] and k in out, k
    # the everyday questions: every chat stage answers all of them, judged; pretrain is not asked
    every = sft["everyday"]
    assert every["n"] == len(everyday.everyday_records()) >= 40 and "everyday" not in pre
    assert sft["everyday_in_kind"] == pytest.approx(every["in_kind"] / every["n"])
    assert sum(b["n"] for b in every["by_category"].values()) == every["n"]
    assert sum(b["k"] for b in every["by_category"].values()) == every["in_kind"]
    words = {d["word"] for d in load_idioms()}
    assert all(x["in_kind"] == everyday.answered_in_kind(x["category"], x["answer"], words) for x in every["asked"])
    assert "everyday_in_kind" not in pre["vs_sft"]                      # nothing to pair pretrain's with
    assert f"({every['in_kind']}/{every['n']})" in out and "everyday: thanks" in out
    # none of the prompts is in the gold part the RL stages select on
    e = _ctx(run).cfg.eval
    gold = prompts.gold_prompts(run, 50, 1234, e.gold_fraction)
    assert gold and all(prompts.is_gold(r, e.gold_fraction) for r in gold)
    assert not {prompts.prompt_id(r) for r in gold} & set(pp["ids"])
    assert prompts.gold_prompts(run, 50, 1234) == gold           # the fraction read from the run's config
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
    sel = prompts.select_prompts(recs, 9, seed=1)
    assert sorted(r["meta"]["kind"] for r in sel) == ["chain"] * 3 + ["meaning"] * 3 + ["pinyin"] * 3
    assert sel == prompts.select_prompts(recs, 9, seed=1) and len(prompts.select_prompts(recs, 100, 1)) == 30
    base = ev.question_baseline([{"messages": [{"role": "user", "content": "甲乙"}], "reference": "甲乙",
                                  "meta": {"kind": "meaning"}}])
    assert base["baseline_question_char_f1"] == 1.0


def test_kl_along_is_exact_zero_for_the_same_model_and_positive_for_a_perturbed_one(run):
    from zero_chatgpt.model.generate import generate
    from zero_chatgpt.model.tokenizer import load_tokenizer
    tok = load_tokenizer(run / "tokenizer")
    sft = ckpt.load_model(run / "sft" / "final")
    other = ckpt.load_model(run / "sft" / "final")
    recs = prompts.select_prompts(chat_data.read_split(run / "sft_data", "eval"), 6, seed=0)
    pids, _ = prompts.encode_prompts(tok, recs, chat=True, limit=100)
    answers = [g.tokens for g in generate(sft, pids, max_new_tokens=5, temperature=0.0, stop_ids=tok.stop_ids)]
    assert metrics.kl_along(sft, other, pids, answers, batch_size=4, pad_id=tok.pad_id) == [0.0] * 6
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = metrics.kl_along(other, sft, pids, answers, batch_size=4, pad_id=tok.pad_id)
    assert all(x > 0 for x in kl)
    # the same as position by position, one unpadded forward per answer token
    with torch.no_grad():
        for i in (0, 5):
            seq = torch.tensor([pids[i] + answers[i]])
            lp, lq = other(seq).log_softmax(-1)[0], sft(seq).log_softmax(-1)[0]
            pos = range(len(pids[i]) - 1, len(pids[i]) + len(answers[i]) - 1)
            want = sum(float((lp[t].exp() * (lp[t] - lq[t])).sum()) for t in pos) / len(answers[i])
            assert kl[i] == pytest.approx(want, rel=1e-4)


def test_win_rate_vs_sft_is_half_when_a_stage_answers_as_sft(run, tmp_path, capsys):
    """A tiny score-head reward model, recorded as a finished rm stage, and a 'ppo' stage with SFT's weights."""
    import shutil

    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    root = tmp_path / "run"
    shutil.copytree(run, root)
    sft = ckpt.load_model(root / "sft" / "final")
    torch.manual_seed(1)
    rm = Transformer(ModelConfig(vocab_size=sft.config.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                                 head="score"))
    ckpt.save_checkpoint(root / "rm", "final", model_state=rm.state_dict(), cfg=rm.config)
    record_stage(root, "rm", reads=["sft"])
    ckpt.save_checkpoint(root / "ppo", "final", model_state=sft.state_dict(), cfg=sft.config)
    record_stage(root, "ppo", reads=["sft", "rm"])
    ev.run_stage(_ctx(root, stage="ppo"))                   # judged beside SFT, which is evaluated too
    ppo = json.loads((root / "eval" / "ppo.json").read_text())
    assert ppo["per_prompt"]["answer"] == json.loads((root / "eval" / "sft.json").read_text())["per_prompt"]["answer"]
    assert ppo["win_rate_vs_sft"] == 0.5 and ppo["kl_to_sft"] == 0.0
    out = capsys.readouterr().err
    assert ppo["same_weights_as"] == "sft" and "its final/ is the SFT model" in out
    assert ppo["vs_sft"]["win_rate_vs_sft"] == {"diff": 0.0, "n": 10, "ci95": [0.0, 0.0]}
    assert all(d["diff"] == 0.0 for d in ppo["vs_sft"].values())
    # SFT's weights answer the everyday questions as SFT did: its figures, a tie on all of them
    sft_res = json.loads((root / "eval" / "sft.json").read_text())
    assert ppo["everyday"] == sft_res["everyday"] and ppo["everyday_in_kind"] == sft_res["everyday_in_kind"]
    assert ppo["vs_sft"]["everyday_in_kind"] == {"diff": 0.0, "n": sft_res["everyday"]["n"], "ci95": [0.0, 0.0]}
    assert "win_rate_vs_sft" in out and "ppo" in out
    # the reward model decides otherwise when the answers differ: a stage with other weights
    other = ckpt.load_model(root / "pretrain" / "final")
    ckpt.save_checkpoint(root / "grpo", "final", model_state=other.state_dict(), cfg=other.config)
    record_stage(root, "grpo", reads=["sft", "rm"])
    ev.run_stage(_ctx(root, stage="grpo"))
    grpo = json.loads((root / "eval" / "grpo.json").read_text())
    assert 0.0 <= grpo["win_rate_vs_sft"] <= 1.0 and grpo["kl_to_sft"] > 0
    assert set(grpo["per_prompt"]["win_rate_vs_sft"]) <= {0.0, 0.5, 1.0}
    assert grpo["everyday"]["n"] == grpo["vs_sft"]["everyday_in_kind"]["n"] >= 40
