"""The rm, dpo, ppo and grpo stages end to end on a tiny real run: preference pairs with every negative kind, a
reward model with its normalization and eval/rm.json, DPO, PPO and GRPO keeping their best gold steps with their
curves in eval/rl_curves.json, eval comparing each to SFT, and PPO killed with SIGKILL mid-rollout resuming to
the same logged rewards and losses as the uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from runs import tiny_args, write_sources, zc
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.model.reward_model import NORM_FILE

RL = {"rm.prompts": 40, "rm.max_steps": 6, "rm.batch_pairs": 8, "rm.micro_batch_pairs": 8, "rm.eval_every": 3,
      "rm.checkpoint_every": 3, "rm.tensorboard": False, "rm.precision": "fp32", "rm.lr": 1e-3, "rm.warmup_steps": 1,
      "dpo.max_steps": 4, "dpo.batch_pairs": 8, "dpo.micro_batch_pairs": 4, "dpo.eval_every": 2,
      "dpo.checkpoint_every": 2, "dpo.tensorboard": False, "dpo.precision": "fp32", "dpo.warmup_steps": 1,
      "dpo.lr": 1e-3, "rl.gold_prompts": 8, "rl.max_new_tokens": 12, "rl.gold_max_new_tokens": 8,
      "eval.num_prompts": 12, "eval.bootstrap": 200, "sft.max_steps": 20,
      "ppo.max_steps": 24, "ppo.prompts_per_rollout": 8, "ppo.eval_every": 8, "ppo.checkpoint_every": 2,
      "ppo.tensorboard": False, "ppo.precision": "fp32", "ppo.log_every": 1, "ppo.lr": 1e-3, "ppo.keep_last": 20,
      "grpo.max_steps": 6, "grpo.prompts_per_rollout": 4, "grpo.samples_per_prompt": 4, "grpo.eval_every": 2,
      "grpo.checkpoint_every": 2, "grpo.tensorboard": False, "grpo.precision": "fp32", "grpo.log_every": 1,
      "grpo.lr": 1e-3, "grpo.reward": "rm", "grpo.kl_coef": 0.04}   # this chat data has no idiom kinds to reward by rule


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlhf")
    corpus, chat = write_sources(root / "src")
    r = zc("run", "--run-dir", root / "run", "--until", "grpo", *tiny_args(**RL),
           "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]')
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "run", r.stderr


@pytest.mark.slow
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


def _kept(gold: list[dict]) -> dict:
    """The evaluation an RL stage keeps: the best gold char_f1 among step 0 (SFT itself) and the trained steps
    whose gold gain over SFT has its 95 % interval above 0."""
    assert all(g["gold_gain_lo"] is not None for g in gold) and gold[0]["gold_gain_lo"] <= 0
    return max((g for g in gold if g["step"] == 0 or g["gold_gain_lo"] > 0), key=lambda g: g["gold_char_f1"])


@pytest.mark.slow
def test_dpo_keeps_its_best_gold_step_and_eval_compares_it_to_sft(run):
    rd, err = run
    train = json.loads((rd / "eval" / "dpo_train.json").read_text())
    assert [c["step"] for c in train["gold"]] == [0, 2, 4]
    best = _kept(train["gold"])
    assert train["selected_step"] == best["step"]
    meta = json.loads((rd / "dpo" / "final" / "meta.json").read_text())
    assert meta["step"] == best["step"] and meta["selected_by"] == "gold_char_f1"
    r = zc("eval", "--run-dir", rd)
    assert r.returncode == 0, r.stderr[-2000:]
    dpo = json.loads((rd / "eval" / "dpo.json").read_text())
    assert "win_rate_vs_sft" in dpo and dpo["kl_to_sft"] >= 0 and "char_f1" in dpo["vs_sft"]
    assert len(dpo["vs_sft"]["char_f1"]["ci95"]) == 2
    # chat's default is now the last aligned model in pipeline order
    r = zc("chat", "--run-dir", rd, input="/quit\n")
    assert r.returncode == 0 and "chatting with grpo" in r.stderr


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_ppo_and_grpo_keep_their_best_gold_step_and_log_their_curves(run, stage):
    rd, err = run
    curves = json.loads((rd / "eval" / "rl_curves.json").read_text())
    assert set(curves) == {"dpo", "ppo", "grpo"}
    c = curves[stage]
    per_rollout = {"ppo": 4, "grpo": 2}[stage]             # epochs x minibatches of the defaults
    assert [x["step"] for x in c["steps"]] == list(range(0, c["trained_steps"], per_rollout))
    assert c["steps"][0]["kl"] == 0.0 and all(abs(x["kl"]) < 1e3 and x["reward"] is not None for x in c["steps"])  # k1: may dip below 0
    assert c["gold"][0]["step"] == 0 and c["selected_step"] == _kept(c["gold"])["step"]
    meta = json.loads((rd / stage / "final" / "meta.json").read_text())
    assert meta["step"] == c["selected_step"] and meta["selected_by"] == "gold_char_f1"
    first = next(json.loads(x) for x in (rd / "logs" / f"{stage}.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "train")
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0
    assert f"{stage}: done" in err and "gold char_f1 by step" in err
    if stage == "ppo":                                        # the critic is trained and saved beside the actor
        assert (rd / "ppo" / f"step-{c['trained_steps']}" / "critic" / "model.safetensors").exists()
        assert ckpt.read_model_config(rd / "ppo" / f"step-{c['trained_steps']}" / "critic").head == "score"


def _train_records(rd, stage):
    return [(r["step"], r["loss"], r["reward"], r["kl"], r["value_loss"])
            for r in map(json.loads, (rd / "logs" / f"{stage}.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.slow
def test_ppo_killed_mid_rollout_resumes_to_the_same_rewards_and_losses(run, tmp_path):
    rd, _ = run
    copy = tmp_path / "run"
    shutil.copytree(rd, copy, ignore=shutil.ignore_patterns("ppo", "grpo", ".lock"))
    (copy / "logs" / "ppo.jsonl").unlink()
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "ppo", "--run-dir", str(copy)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (copy / "ppo" / "step-6").is_dir():          # 6 is inside the second rollout (steps 4-7)
        assert p.poll() is None and time.time() - t0 < 120, "ppo ended before its step-6 checkpoint"
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (copy / "ppo" / "final").exists()
    r = zc("ppo", "--run-dir", copy)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ppo: resuming from" in r.stderr
    resumed_at = int(r.stderr.split("ppo: resuming from")[1].split("(step ")[1].split(")")[0])
    assert resumed_at % 4, f"resumed at step {resumed_at}, a rollout boundary: the buffer restore was not exercised"
    assert _train_records(copy, "ppo") == _train_records(rd, "ppo")
    assert (copy / "ppo" / "final" / "model.safetensors").read_bytes() == \
        (rd / "ppo" / "final" / "model.safetensors").read_bytes()
