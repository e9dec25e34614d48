"""Exact resume: a training run killed with SIGKILL (also in the middle of writing a checkpoint)
resumes from its last complete checkpoint and logs bitwise the losses of an uninterrupted run.

The run is a real subprocess (this file is also the driver, see `main`), training a tiny
LLaMA on real Chinese text (People's Daily, byte-level ids) through the one training loop,
CPU, fp32, one thread.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

VOCAB = 259   # bytes + a few ids; 258 = end of document
HERE = Path(__file__).resolve()


def make_shards(tokens_dir: Path) -> None:
    from zero_chatgpt.model import token_shards as tokens
    from zero_chatgpt.data.builtin import iter_peoples_daily
    tokens_dir.mkdir(parents=True, exist_ok=True)
    docs = [list(a["text"].encode()) + [258] for a in itertools.islice(iter_peoples_daily(), 60)]
    tokens.write_shard(tokens_dir / "train-00000.bin", docs[:50], VOCAB)
    tokens.write_shard(tokens_dir / "val-00000.bin", docs[50:], VOCAB)


def main(argv=None) -> None:
    """Driver: train a tiny model with the loop; used by the tests in this file and test_distributed.py."""
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--ckpt-every", type=int, default=3)
    ap.add_argument("--slow-save", type=float, default=0.0, help="sleep this long per file synced (test hook)")
    ap.add_argument("--step-sleep", type=float, default=0.0, help="sleep this long per batch (test hook)")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    ap.add_argument("--constant", action="store_true", help="constant learning rate (a raised --steps continues exactly)")
    ap.add_argument("--noisy", action="store_true", help="a loss that draws from each rank's RNG (dropout-like)")
    ap.add_argument("--metrics", action="store_true", help="log per-rank metrics, named in a per-rank order")
    a = ap.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    from zero_chatgpt.core import checkpoint as ckpt
    from zero_chatgpt.model import token_shards as tokens
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    from zero_chatgpt.train import loop
    from zero_chatgpt.stages.pretrain import PackedBlocks, ValEval, lm_loss_fn

    if a.slow_save:
        real = ckpt.write_file
        ckpt.write_file = lambda p, data: (time.sleep(a.slow_save), real(p, data))
    d = loop.setup_distributed("cpu")
    if d.main and not (a.run_dir / "tokens").exists():
        make_shards(a.run_dir / "tokens")
    if d.world > 1:
        torch.distributed.barrier()
    train = tokens.load_split(a.run_dir / "tokens", "train")
    val = tokens.load_split(a.run_dir / "tokens", "val")
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    s = loop.LoopSettings(max_steps=a.steps, lr=3e-3, warmup_steps=2, precision="fp32", grad_accum=a.accum,
                          checkpoint_every=a.ckpt_every, keep_last=2, eval_every=4, log_every=1, tensorboard=False,
                          seed=7, fsdp=a.fsdp, schedule="constant" if a.constant else "cosine")
    blocks = PackedBlocks(train, 32, seed=7, micro_batch_size=a.micro, grad_accum=a.accum)
    inner = blocks
    if a.step_sleep:
        def inner(step, micro, rank, world):
            time.sleep(a.step_sleep)
            return blocks(step, micro, rank, world)
    loss_fn = lm_loss_fn
    if a.noisy or a.metrics:
        def loss_fn(m, batch):
            loss, metrics, n = lm_loss_fn(m, batch)
            if a.noisy:     # each rank's own random stream scales its loss (and gradients)
                loss = loss * (1 + 0.05 * torch.rand(()))
            if a.metrics:   # ranks name their metrics in different orders; rank 1 has one more
                metrics = {"a": float(d.rank + 1), "b": 10.0 * (d.rank + 1)}
                if d.rank == 1:
                    metrics = {"c": 5.0, **dict(reversed(list(metrics.items())))}
            return loss, metrics, n
    loop.train(s, model=model, stage="pretrain", stage_dir=a.run_dir / "pretrain", log_dir=a.run_dir / "logs",
               batches=inner, loss_fn=loss_fn, eval_fn=ValEval(val, 32, 256, 4, None), dist_info=d,
               tokens_per_step=32 * a.micro * a.accum * d.world)


def driver(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE), str(run_dir), *extra]


def run_env() -> dict:
    env = dict(os.environ, ZC_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(HERE.parents[2]) + os.pathsep + env.get("PYTHONPATH", "")   # the repository
    return env


def read_log(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    recs = [json.loads(line) for line in (run_dir / "logs" / "pretrain.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in recs if r["kind"] == "train"]
    evals = [(r["step"], r["val_loss"]) for r in recs if r["kind"] == "eval"]
    return train, evals


def wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the driver")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    subprocess.run(driver(ref), check=True, env=run_env(), timeout=120)
    return read_log(ref)


@pytest.mark.slow
def test_uninterrupted_run_logs_every_step(reference):
    train, evals = reference
    assert [s for s, _ in train] == list(range(1, 13))
    assert [s for s, _ in evals] == [4, 8, 12]
    assert train[-1][1] < train[0][1] - 0.5   # it learns


@pytest.mark.slow
def test_sigkill_mid_save_and_mid_step_resumes_bitwise(reference, tmp_path):
    # 1) killed while writing step-6 (the save is slowed so the kill lands inside it)
    p = subprocess.Popen(driver(tmp_path, "--slow-save", "0.3"), env=run_env(), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "pretrain" / ".tmp-step-6").exists(), p)
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (tmp_path / "pretrain" / "step-3").exists() and not (tmp_path / "pretrain" / "step-6").exists()
    # 2) resumed from step-3, killed again between checkpoints (in the middle of step 8)
    p = subprocess.Popen(driver(tmp_path, "--step-sleep", "0.05"), env=run_env(), stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "pretrain" / "step-6").exists(), p)
    wait_for(lambda: sum(1 for _ in open(tmp_path / "logs" / "pretrain.jsonl")) >= 9, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "pretrain" / "final").exists()
    # 3) runs to the end
    r = subprocess.run(driver(tmp_path), env=run_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "step 6" in r.stderr
    train, evals = read_log(tmp_path)
    assert train == reference[0]          # bitwise: floats compared exactly
    assert evals == reference[1]
    ckpts = sorted(p.name for p in (tmp_path / "pretrain").iterdir())
    assert ckpts == ["final", "step-12", "step-9"]   # keep_last = 2, no .tmp left


if __name__ == "__main__":
    main()


def test_init_from_hf_folder_and_wrong_shape(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.core.errors import UserError
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    from zero_chatgpt.train import loop
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=16)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf_dict()))
    hf.save_pretrained(tmp_path / "hf")
    s = loop.LoopSettings(max_steps=0, init_from=str(tmp_path / "hf"), tensorboard=False, precision="fp32")
    kw = dict(stage="x", log_dir=tmp_path / "logs", batches=None, loss_fn=None)
    loop.train(s, model=Transformer(cfg), stage_dir=tmp_path / "x", **kw)
    got = load_model(tmp_path / "x" / "final").state_dict()
    assert all(torch.equal(got[k], v) for k, v in hf.state_dict().items())
    wrong = ModelConfig(**{**cfg.__dict__, "hidden_size": 32})
    with pytest.raises(UserError, match="init_from"):
        loop.train(s, model=Transformer(wrong), stage_dir=tmp_path / "y", **kw)
