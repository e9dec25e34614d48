"""Two nodes on one machine: two torchrun launchers (--nnodes 2 --node_rank 0|1, one process each,
rendezvous on 127.0.0.1, gloo) train with the losses of one process with the same global batch,
and, after one node is SIGKILLed mid-run and the job started again, resume from the checkpoint to
the same losses."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

from runs import kill, node_tree
from test_loop_resume import HERE, read_log, run_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(run_dir, opts: list[str]) -> list[subprocess.Popen]:
    """One launcher per node, each in its own session (a node's kill takes its launcher and worker)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              str(HERE), str(run_dir)] + opts,
                             env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    outs = []
    for p in nodes:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def assert_same_losses(a, b, tol: float) -> None:
    (ta, ea), (tb, eb) = read_log(a), read_log(b)
    assert [s for s, _ in ta] == [s for s, _ in tb] == list(range(1, 7))
    assert len(ea) == len(eb) > 0
    for (_, x), (_, y) in zip(ta + ea, tb + eb):
        assert abs(x - y) <= tol, (x, y)


def test_two_nodes_match_one_process_and_resume_after_a_node_is_killed(tmp_path):
    one, nodes, killed = tmp_path / "one", tmp_path / "nodes", tmp_path / "killed"
    subprocess.run([sys.executable, str(HERE), str(one), "--steps", "6", "--accum", "2", "--ckpt-every", "2"],
                   check=True, env=run_env(), timeout=120)
    opts = ["--steps", "6", "--accum", "1", "--ckpt-every", "2"]
    finish(launch_nodes(nodes, opts))
    assert_same_losses(one, nodes, 1e-5)
    # only the global rank 0 (on node 0) writes: one log, one set of checkpoints (the last two kept)
    assert sorted(p.name for p in (nodes / "pretrain").iterdir()) == ["final", "step-4", "step-6"]
    assert not any((nodes / "logs").glob("*rank*"))

    # node 1 dies (SIGKILL to its launcher and worker) after the step-2 checkpoint, mid-step 3
    run = launch_nodes(killed, opts + ["--step-sleep", "0.5"])
    t0 = time.time()
    while not (killed / "pretrain" / "step-2").exists():
        assert all(p.poll() is None for p in run), "a node exited before writing step-2"
        assert time.time() - t0 < 120, "timed out waiting for step-2"
        time.sleep(0.02)
    trees = [node_tree(p) for p in run]
    assert all(len(t) == 2 for t in trees), "each node: a launcher and one worker"
    kill(trees[1])
    run[1].wait()
    # node 0 cannot finish without its peer: it fails or waits in a collective; the job is then
    # stopped and started again as a scheduler would (both launchers, same command)
    try:
        run[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    kill(trees[0])
    run[0].wait()
    assert not (killed / "pretrain" / "final").exists()
    assert not (killed / "pretrain" / "step-6").exists()
    outs = finish(launch_nodes(killed, opts))
    assert "resuming from" in outs[0] + outs[1]
    assert_same_losses(one, killed, 1e-5)
