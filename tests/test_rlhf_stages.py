"""The rm and dpo stages end to end on a tiny real run: preference pairs with every negative kind, a reward
model with its normalization and eval/rm.json, DPO keeping its best gold step, and eval comparing it to SFT."""
import json

import pytest

from runs import tiny_args, write_sources, zc
from zero_chatgpt import checkpoint as ckpt
from zero_chatgpt.rewards import NORM_FILE

RL = {"rm.prompts": 40, "rm.max_steps": 6, "rm.batch_pairs": 8, "rm.micro_batch_pairs": 8, "rm.eval_every": 3,
      "rm.checkpoint_every": 3, "rm.tensorboard": False, "rm.precision": "fp32", "rm.lr": 1e-3, "rm.warmup_steps": 1,
      "dpo.max_steps": 4, "dpo.batch_pairs": 8, "dpo.micro_batch_pairs": 4, "dpo.eval_every": 2,
      "dpo.checkpoint_every": 2, "dpo.tensorboard": False, "dpo.precision": "fp32", "dpo.warmup_steps": 1,
      "dpo.lr": 1e-3, "rl.gold_prompts": 8, "rl.max_new_tokens": 12, "rl.gold_max_new_tokens": 8,
      "eval.num_prompts": 12, "eval.bootstrap": 200, "sft.max_steps": 20}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    corpus, chat = write_sources(root / "src")
    r = zc("run", "--run-dir", root / "run", "--until", "dpo", *tiny_args(**RL),
           "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]')
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", r.stderr


def test_the_reward_model_stage(run):
    rd, err = run
    pairs = [json.loads(x) for x in (rd / "rm_data" / "train.jsonl").read_text().splitlines()]
    assert {p["negative"] for p in pairs} == {"sample", "other", "cut", "repeat", "refusal", "empty"}
    assert all(not p["rejected_ended"] for p in pairs if p["negative"] == "cut")
    res = json.loads((rd / "eval" / "rm.json").read_text())
    assert 0 <= res["accuracy"] <= 1 and set(res["probe_pass"]) == {"other", "cut", "repeat", "refusal", "empty"}
    assert "gold_agreement" in res and abs(res["normalized_sft_samples"]["mean"]) < 1e-6
    norm = json.loads((rd / "rm" / "final" / NORM_FILE).read_text())
    assert norm["fitted_on"] > 0 and NORM_FILE in json.loads((rd / "rm" / "final" / "manifest.json").read_text())["files"]
    assert ckpt.read_model_config(rd / "rm" / "final").head == "score"
    assert "rm: done" in err and "probe_pass: refusal" in err


def test_dpo_keeps_its_best_gold_step_and_eval_compares_it_to_sft(run):
    rd, err = run
    train = json.loads((rd / "eval" / "dpo_train.json").read_text())
    assert [c["step"] for c in train["gold"]] == [0, 2, 4]
    best = max((c for c in train["gold"] if c["step"] > 0), key=lambda c: c["gold_char_f1"])
    assert train["selected_step"] == best["step"]
    meta = json.loads((rd / "dpo" / "final" / "meta.json").read_text())
    assert meta["step"] == best["step"] and meta["selected_by"] == "gold_char_f1"
    r = zc("eval", "--run-dir", rd)
    assert r.returncode == 0, r.stderr[-2000:]
    dpo = json.loads((rd / "eval" / "dpo.json").read_text())
    assert "win_rate_vs_sft" in dpo and dpo["kl_to_sft"] >= 0 and "char_f1" in dpo["vs_sft"]
    assert len(dpo["vs_sft"]["char_f1"]["ci95"]) == 2
    # chat's default is now the DPO model
    r = zc("chat", "--run-dir", rd, input="/quit\n")
    assert r.returncode == 0 and "chatting with dpo" in r.stderr
