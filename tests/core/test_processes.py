"""Processes: workers die with the command (kill -9 leaves no orphan), Ctrl-C is one line, and under
torchrun the stages that are not distributed run on rank 0 alone while the other ranks wait."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from runs import tiny_args, write_sources


def tagged_processes(tag: str) -> list[str]:
    """Processes whose environment carries ZC_TEST_TAG=tag (the command and everything it started)."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/environ", "rb") as fh:
                if f"ZC_TEST_TAG={tag}".encode() in fh.read().split(b"\0"):
                    with open(f"/proc/{p}/cmdline", "rb") as c:
                        found.append(f"{p}: {c.read().replace(bytes(1), b' ').decode(errors='replace')[:120]}")
        except OSError:
            pass
    return found


def start(*args, tag):
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "ZC_TEST_TAG": tag}
    return subprocess.Popen([sys.executable, "-m", "zero_chatgpt", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(pred, proc, timeout=60.0):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"the command ended before the kill: {proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def assert_no_orphans(tag: str, within: float = 1.0) -> None:
    t0 = time.time()
    while tagged_processes(tag) and time.time() - t0 < within:
        time.sleep(0.02)
    left = tagged_processes(tag)
    assert not left, f"left running {time.time() - t0:.1f} s after the kill: {left}"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("proc_src"))


def test_kill_9_of_data_leaves_no_worker(sources, tmp_path):
    corpus, _ = sources
    tag = uuid.uuid4().hex
    p = start("data", "--run-dir", tmp_path, "--source", f"jsonl:{corpus}", *tiny_args(**{"data.shard_docs": 50}),
              tag=tag)
    work = tmp_path / "data" / "work"
    # workers running, a part done: the middle of the cleaning phase
    wait_until(lambda: len(tagged_processes(tag)) >= 4 and len(list(work.glob("part-*.json"))) >= 1, p)
    p.kill()
    p.wait()
    assert_no_orphans(tag)


@pytest.mark.slow
def test_kill_9_of_tokenizer_while_encoding_leaves_no_worker(sources, tmp_path):
    corpus, _ = sources
    args = tiny_args(**{"data.shard_docs": 100, "tokenizer.num_threads": 2})
    r = subprocess.run([sys.executable, "-m", "zero_chatgpt", "data", "--run-dir", str(tmp_path),
                        "--source", f"jsonl:{corpus}", *args], capture_output=True, text=True,
                       env={**os.environ, "ZC_NO_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    tag = uuid.uuid4().hex
    p = start("tokenizer", "--run-dir", tmp_path, tag=tag)
    # many shards: whole shards go to worker processes
    wait_until(lambda: any("multiprocessing" in x and "resource_tracker" not in x for x in tagged_processes(tag)), p)
    p.kill()
    p.wait()
    assert_no_orphans(tag)


def test_ctrl_c_is_one_line(sources, tmp_path):
    corpus, _ = sources
    tag = uuid.uuid4().hex
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "ZC_TEST_TAG": tag}
    # SIGINT as a terminal's foreground command has it: a runner that started these tests in the background
    # (`cmd &` in a script) passes SIGINT down ignored, and Python then never raises KeyboardInterrupt
    p = subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "data", "--run-dir", str(tmp_path),
                          "--source", f"jsonl:{corpus}", *tiny_args(**{"data.shard_docs": 50})],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until(lambda: len(tagged_processes(tag)) >= 4, p)
    time.sleep(0.02)                         # inside the work: the tiny stage can end within 0.3 s
    os.killpg(p.pid, signal.SIGINT)          # what a terminal does: the whole foreground process group
    _, err = p.communicate(timeout=30)
    assert p.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("interrupted: run the same command again")
    assert_no_orphans(tag)


@pytest.mark.slow
def test_under_torchrun_only_rank_0_runs_the_data_stages(sources, tmp_path):
    """`torchrun -m zero_chatgpt run`: data and tokenizer on rank 0 alone, pretraining and SFT on both, and
    no rank reads a stage's output before rank 0 has recorded it (SFT starts right after pretraining)."""
    corpus, chat = sources
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "zero_chatgpt", "run",
                        "--run-dir", str(tmp_path), "--until", "sft", *tiny_args(**{"pretrain.batch_tokens": 256}),
                        "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # every part and the tokenizer came from one process; pretraining ran on both (DDP)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["parts"] > 1 and len(stats["part_commands"]) == 1
    assert r.stderr.count("\ndata: reading jsonl") == 1 and r.stderr.count("training a 512-token") == 1
    assert "2 process(es) on cpu" in r.stderr
    assert (tmp_path / "pretrain" / "final" / "model.safetensors").exists()
    assert r.stderr.count("sft: done") == 1 and (tmp_path / "sft" / "final" / "model.safetensors").exists()
