"""Checkpoints are complete or absent: a manifest checked on load, damaged ones passed over (or one line
offering --force), writes that fail on a full disk or a file size limit say where and why and leave the
previous checkpoint loadable, final/ without the optimizer, file modes from the umask."""
import json
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest

from runs import tiny_args, write_sources, zc
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.errors import UserError


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_master")
    corpus, _ = write_sources(root / "src")
    r = zc("run", "--run-dir", root / "run", "--until", "pretrain", *tiny_args(),
           "--set", f'data.sources=["jsonl:{corpus}"]')
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture
def run(master, tmp_path):
    shutil.copytree(master / "src", tmp_path / "src")
    shutil.copytree(master / "run", tmp_path / "run")
    return tmp_path / "run"


def _losses(run):
    recs = [json.loads(x) for x in (run / "logs" / "pretrain.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


@pytest.mark.slow
def test_final_holds_the_model_only_copied_from_the_last_step(master):
    final, last = master / "run" / "pretrain" / "final", master / "run" / "pretrain" / "step-12"
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "manifest.json", "meta.json",
                                                       "model.safetensors"]
    assert (last / "trainer_state.pt").exists()
    # a copy, not a hard link: one damaged file must not take final/ and its source down together
    assert (final / "model.safetensors").stat().st_ino != (last / "model.safetensors").stat().st_ino
    assert (final / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
    files = json.loads((last / "manifest.json").read_text())["files"]
    assert set(files) == {"config.json", "meta.json", "model.safetensors", "trainer_state.pt"}
    assert all(len(v["xxh3_128"]) == 32 and v["size"] > 0 for v in files.values())


@pytest.mark.slow
def test_file_modes_follow_the_umask(tmp_path):
    code = ("import os, sys, torch\nos.umask(int(sys.argv[2], 8))\n"
            "from zero_chatgpt.core import checkpoint as c\nfrom zero_chatgpt.model.transformer import ModelConfig, Transformer\n"
            "m = Transformer(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, "
            "num_attention_heads=2, max_position_embeddings=16))\n"
            "c.save_checkpoint(sys.argv[1], 'step-1', model_state=m.state_dict(), cfg=m.config, trainer_state={'step': 1})\n")
    for umask, want in (("022", 0o644), ("027", 0o640)):
        d = tmp_path / umask
        r = subprocess.run([sys.executable, "-c", code, str(d), umask], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (d / "step-1").iterdir()}
        assert modes == dict.fromkeys(modes, want) and "model.safetensors" in modes


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate model", "empty trainer state", "flip a byte"])
def test_a_damaged_latest_checkpoint_is_passed_over(run, damage):
    before = _losses(run)
    last = run / "pretrain" / "step-12"
    if damage == "truncate model":
        p = last / "model.safetensors"
        with open(p, "r+b") as fh:
            fh.truncate(p.stat().st_size // 2)
    elif damage == "empty trainer state":
        (last / "trainer_state.pt").write_bytes(b"")
    else:
        p = last / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    r = zc("pretrain", "--run-dir", run, "--set", "pretrain.max_steps=16")
    assert r.returncode == 0, r.stderr
    assert f"checkpoint {last} is damaged" in r.stderr and "Traceback" not in r.stderr
    assert "resuming from" in r.stderr and "step-8" in r.stderr
    after = _losses(run)
    assert [after[s] for s in range(1, 9)] == [before[s] for s in range(1, 9)]
    assert max(after) == 16 and all(s in after for s in range(9, 17))


@pytest.mark.slow
def test_no_intact_checkpoint_left_offers_force(run):
    for p in (run / "pretrain").glob("step-*"):
        (p / "manifest.json").unlink()
    r = zc("pretrain", "--run-dir", run, "--set", "pretrain.max_steps=16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "has no intact step-N checkpoint left" in r.stderr and "--force" in r.stderr
    # manifests there but wrong: the loop passes over each, then one line offering --force
    for p in (run / "pretrain").glob("step-*"):
        (p / "manifest.json").write_text("{}")
    r = zc("pretrain", "--run-dir", run, "--set", "pretrain.max_steps=16")
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert last.startswith("error: no intact checkpoint in") and "--force" in last
    # the finished 12-step model is still what the run holds: asked for again, it is up to date
    r = zc("pretrain", "--run-dir", run, "--set", "pretrain.max_steps=12")
    assert r.returncode == 0 and "pretrain: up to date" in r.stderr


@pytest.mark.slow
def test_a_damaged_final_is_named_when_loaded(run, tmp_path):
    final = run / "pretrain" / "final"
    with open(final / "model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(UserError, match=r"damaged checkpoint .*model.safetensors has 1,000 bytes"):
        ckpt.load_model(final)
    r = zc("export", "--run-dir", run, "--stage", "pretrain", "--out", tmp_path / "hf")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model.safetensors has 1,000 bytes" in r.stderr
    # the stage itself notices and rebuilds final/ from its last intact checkpoint
    r = zc("pretrain", "--run-dir", run)
    assert r.returncode == 0 and "final is damaged" in r.stderr
    ckpt.load_model(final)


def _limit_file_size(limit):
    def pre():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.slow
def test_a_write_that_fails_says_where_and_why_and_keeps_the_last_checkpoint(run):
    model_bytes = (run / "pretrain" / "step-12" / "model.safetensors").stat().st_size
    env = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    # more than any log or marker, less than a model file: the next checkpoint cannot be written
    r = subprocess.run([sys.executable, "-m", "zero_chatgpt", "pretrain", "--run-dir", str(run),
                        "--set", "pretrain.max_steps=16"], capture_output=True, text=True, env=env,
                       preexec_fn=_limit_file_size(model_bytes // 2), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot write or read ") and "model.safetensors" in last
    assert "File too large" in last and "run the same command again" in last
    assert ckpt.latest_checkpoint(run / "pretrain") == run / "pretrain" / "step-12"
    ckpt.load_model(run / "pretrain" / "step-12")
    # without the limit, the same command goes on from there
    r = zc("pretrain", "--run-dir", run, "--set", "pretrain.max_steps=16")
    assert r.returncode == 0 and "(step 12)" in r.stderr


@pytest.mark.slow
def test_a_bit_flip_in_final_is_found_by_its_hash_and_rebuilt(run):
    final = run / "pretrain" / "final"
    data = bytearray((final / "model.safetensors").read_bytes())
    data[len(data) // 3] ^= 0x01
    (final / "model.safetensors").write_bytes(bytes(data))
    r = zc("pretrain", "--run-dir", run)
    assert r.returncode == 0 and "final is damaged" in r.stderr and "hash differs" in r.stderr
    assert (final / "model.safetensors").read_bytes() == (run / "pretrain" / "step-12" / "model.safetensors").read_bytes()
    ckpt.load_model(final)
    r = zc("pretrain", "--run-dir", run)
    assert r.returncode == 0 and "pretrain: up to date" in r.stderr
