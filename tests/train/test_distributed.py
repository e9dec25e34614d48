"""Distributed data parallel: 2 processes under torchrun (gloo, CPU) give the losses of one
process with the same global batch (2 x accumulation), within 1e-5."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_loop_resume import HERE, read_log, run_env


def one_and_two_processes(one: Path, two: Path, one_args: list[str], two_args: list[str]):
    """Train the same run in one process and under torchrun with two; both (train, eval) logs."""
    subprocess.run([sys.executable, str(HERE), str(one), *one_args], check=True, env=run_env(), timeout=120)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE), str(two), *two_args], env=run_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_log(one), read_log(two)


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    (t1, e1), (t2, e2) = one_and_two_processes(one, two, ["--steps", "6", "--accum", "2", "--ckpt-every", "0"],
                                               ["--steps", "6", "--accum", "1", "--ckpt-every", "0"])
    assert [s for s, _ in t1] == [s for s, _ in t2] == list(range(1, 7))
    for (_, a), (_, b) in zip(t1 + e1, t2 + e2):
        assert abs(a - b) <= 1e-5, (a, b)
    # only rank 0 wrote: one log, one set of checkpoints
    assert sorted(p.name for p in (two / "pretrain").iterdir()) == ["final", "step-6"]
    assert not any(Path(two / "logs").glob("*rank*"))


@pytest.mark.slow
def test_two_process_fsdp_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "fsdp"
    (t1, e1), (t2, e2) = one_and_two_processes(one, two, ["--steps", "4", "--accum", "2", "--ckpt-every", "2"],
                                               ["--steps", "4", "--ckpt-every", "2", "--fsdp"])
    assert len(t1) == len(t2) == 4
    for (_, a), (_, b) in zip(t1 + e1, t2 + e2):
        assert abs(a - b) <= 1e-5, (a, b)
    # the sharded state was gathered into one full checkpoint that loads like any other
    from zero_chatgpt.core.checkpoint import load_model, load_trainer_state
    a, b = load_model(one / "pretrain" / "final"), load_model(two / "pretrain" / "final")
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert load_trainer_state(two / "pretrain" / "step-4")["step"] == 4


@pytest.mark.slow
def test_fsdp_run_killed_after_a_checkpoint_resumes_exactly(tmp_path):
    """FSDP2 under torchrun: SIGKILL the whole job after its step-2 checkpoint, start it again, and
    the resumed run (sharded optimizer state restored from the gathered checkpoint) logs the losses
    of an uninterrupted FSDP run."""
    import time

    from runs import kill, node_tree
    ref, run = tmp_path / "ref", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE)]
    opts = ["--steps", "4", "--ckpt-every", "2", "--fsdp"]
    r = subprocess.run(cmd + [str(ref)] + opts, env=run_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(cmd + [str(run)] + opts + ["--step-sleep", "0.5"], env=run_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not (run / "pretrain" / "step-2").exists():
        assert p.poll() is None, "the FSDP run exited before writing step-2"
        assert time.time() - t0 < 120, "timed out waiting for step-2"
        time.sleep(0.02)
    kill(node_tree(p))   # torchrun and both workers (each in a session of its own), mid-step 3
    p.wait()
    assert not (run / "pretrain" / "final").exists()
    r = subprocess.run(cmd + [str(run)] + opts, env=run_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    t_ref, e_ref = read_log(ref)
    t_run, e_run = read_log(run)
    assert [s for s, _ in t_run] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(t_ref + e_ref, t_run + e_run):
        assert abs(a - b) <= 1e-6, (a, b)
