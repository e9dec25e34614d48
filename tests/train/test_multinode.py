"""Two nodes on one machine: two torchrun launchers (--nnodes 2 --node_rank 0|1, one process each,
rendezvous on 127.0.0.1, gloo) run `-m zero_chatgpt pretrain`, the command the README gives for a
cluster, and log the losses of one process with the same global batch; after one node is SIGKILLed
mid-run and the job started again, they resume from the checkpoint to bitwise the losses of the
uninterrupted two-node run."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from runs import kill, node_tree, tiny_args, write_sources, zc

STEPS = 200                     # ~2 s of training after the first checkpoint: time to kill a node mid-run
ARGS = {"pretrain.batch_tokens": 256, "pretrain.max_steps": STEPS, "pretrain.checkpoint_every": 20,
        "pretrain.eval_every": 50}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_nodes(run_dir, args: list[str]) -> list[subprocess.Popen]:
    """One launcher per node, each in its own session (a node's kill takes its launcher and worker)."""
    port = free_port()
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                              "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                              "-m", "zero_chatgpt", "pretrain", "--run-dir", str(run_dir), *args],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
            for rank in (0, 1)]


def finish(nodes: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    outs = []
    for p in nodes:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]
        outs.append(out)
    return outs


def losses(run_dir) -> list[tuple[str, int, float]]:
    recs = [json.loads(x) for x in (run_dir / "logs" / "pretrain.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in recs if r["kind"] in ("train", "eval")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A run directory with data, tokenizer and token shards (single process), and its pretrain arguments."""
    root = tmp_path_factory.mktemp("multinode")
    corpus, _ = write_sources(root / "src")
    args = [*tiny_args(**ARGS), "--set", f'data.sources=["jsonl:{corpus}"]']
    r = zc("run", "--run-dir", root / "base", "--until", "tokenizer", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return root, args


def copy_of(root, name):
    shutil.copytree(root / "base", root / name)
    return root / name


@pytest.mark.slow
def test_two_nodes_match_one_process_and_resume_after_a_node_is_killed(prepared):
    root, args = prepared
    one, nodes, killed = copy_of(root, "one"), copy_of(root, "nodes"), copy_of(root, "killed")
    r = zc("pretrain", "--run-dir", one, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    outs = finish(launch_nodes(nodes, args))
    assert "2 process(es)" in outs[0]
    a, b = losses(one), losses(nodes)
    assert [(k, s) for k, s, _ in a] == [(k, s) for k, s, _ in b]
    assert sum(k == "train" for k, _, _ in a) == STEPS and any(k == "eval" for k, _, _ in a)
    # the same global batch in one process (2 micro-batches accumulated) and on two nodes (one each):
    # the same losses up to float summation order
    for (_, s, x), (_, _, y) in zip(a, b):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (s, x, y)
    # only the global rank 0 (on node 0) writes: one log, one set of checkpoints (the last two kept)
    assert sorted(p.name for p in (nodes / "pretrain").iterdir() if p.is_dir()) == \
        ["final", f"step-{STEPS - 20}", f"step-{STEPS}"]
    assert not any((nodes / "logs").glob("*rank*"))

    # node 1 dies (SIGKILL to its launcher and worker) after the first checkpoint, mid-run
    run = launch_nodes(killed, args)
    t0 = time.time()
    while not (killed / "pretrain" / "step-20").exists():
        assert all(p.poll() is None for p in run), "a node exited before writing step-20"
        assert time.time() - t0 < 120, "timed out waiting for step-20"
        time.sleep(0.01)
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
    assert not (killed / "pretrain" / "final").exists(), "the run finished before the kill: raise STEPS"
    outs = finish(launch_nodes(killed, args))
    assert "resuming from" in outs[0] + outs[1]
    # the log of the resumed run: the steps after the checkpoint logged again, as the uninterrupted run did
    c = losses(killed)
    last = {}
    for k, s, x in c:
        last[(k, s)] = x
    assert last == {(k, s): x for k, s, x in b}
