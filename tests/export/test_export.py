"""End to end on a tiny real run: `zero-chatgpt pretrain` (CLI) on real text with the real
tokenizer, then `zero-chatgpt export --format hf`, loaded by transformers with no custom code:
logits within 1e-4 of ours and identical greedy generations."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from runs import record_stage
from zero_chatgpt.model import token_shards as tokens
from zero_chatgpt.core.checkpoint import load_model
from zero_chatgpt.data.builtin import iter_peoples_daily
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.tokenizer import load_tokenizer, train_bpe

TINY = ["--set", "model.hidden_size=64", "--set", "model.intermediate_size=128", "--set", "model.num_hidden_layers=2",
        "--set", "model.num_attention_heads=4", "--set", "model.num_key_value_heads=2",
        "--set", "model.max_position_embeddings=128", "--set", "pretrain.seq_len=64",
        "--set", "pretrain.micro_batch_size=8", "--set", "pretrain.batch_tokens=512",
        "--set", "pretrain.max_steps=30", "--set", "pretrain.warmup_steps=3", "--set", "pretrain.lr=3e-3",
        "--set", "pretrain.eval_every=10", "--set", "pretrain.checkpoint_every=10", "--set", "pretrain.eval_tokens=2048",
        "--set", "pretrain.samples=2", "--set", "pretrain.sample_tokens=16", "--set", "pretrain.tensorboard=false"]


def cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "zero_chatgpt", *args], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rd = tmp_path_factory.mktemp("run")
    docs = [a["text"] for a in itertools.islice(iter_peoples_daily(), 240)]
    tok = train_bpe(docs, 600)
    tok.save(rd / "tokenizer")
    tok = load_tokenizer(rd / "tokenizer")
    (rd / "tokens").mkdir()
    tokens.write_shard(rd / "tokens" / "train-00000.bin", [tok.encode(t) + [tok.eot_id] for t in docs[:220]],
                       tok.vocab_size)
    tokens.write_shard(rd / "tokens" / "val-00000.bin", [tok.encode(t) + [tok.eot_id] for t in docs[220:]],
                       tok.vocab_size)
    record_stage(rd, "tokenizer")
    r = cli("pretrain", "--preset", "demo", "--run-dir", str(rd), *TINY)
    return rd, r


@pytest.mark.slow
def test_pretrain_cli_writes_checkpoint_logs_and_eval(run):
    rd, r = run
    final = rd / "pretrain" / "final"
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    assert sorted(p.name for p in (rd / "pretrain").glob("step-*")) == ["step-20", "step-30"]
    ev = json.loads((rd / "eval" / "pretrain.json").read_text())
    assert [c["step"] for c in ev["curve"]] == [10, 20, 30]
    assert ev["curve"][-1]["val_bpc"] < ev["curve"][0]["val_bpc"]        # it learns
    assert 0 < ev["val_bpc"] < 12 and ev["val_loss"] == ev["curve"][-1]["val_loss"]
    assert len(ev["samples"]) == 2 and ev["samples"][0]["text"].startswith("中国")
    recs = [json.loads(x) for x in (rd / "logs" / "pretrain.jsonl").read_text().splitlines()]
    train = [x for x in recs if x["kind"] == "train"]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(train[-1])
    assert "pretrain: done" in r.stderr
    # a second call is a no-op (inputs unchanged)
    again = cli("pretrain", "--run-dir", str(rd))
    assert "up to date" in again.stderr


def test_export_hf_parity_with_transformers(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rd, _ = run
    out = tmp_path / "hf"
    cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--format", "hf", "--out", str(out))
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    ours = load_model(rd / "pretrain" / "final")
    tok = load_tokenizer(rd / "tokenizer")
    text = "中国经济发展，人民生活水平不断提高。"
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4, diff
    prompts = [tok.encode(p) for p in ["中国", "北京市人民", "经济"]]
    mine = generate(ours, prompts, max_new_tokens=20, temperature=0)
    for p, g in zip(prompts, mine):
        h = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                        max_new_tokens=20, eos_token_id=None, pad_token_id=tok.pad_id)
        assert h[0, len(p):].tolist() == g.tokens
    # batched with left padding, HF's way, gives the same rows
    enc = hf_tok([tok.decode(p) for p in prompts], return_tensors="pt", padding=True, padding_side="left")
    h = hf.generate(**enc, do_sample=False, max_new_tokens=20, eos_token_id=None, pad_token_id=tok.pad_id)
    assert [row[enc["input_ids"].shape[1]:].tolist() for row in h] == [g.tokens for g in mine]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == list(tok.stop_ids)


@pytest.mark.slow
def test_export_errors_are_one_line(run, tmp_path):
    rd, _ = run
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--format", "gguf", "--out", str(tmp_path),
            check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "writes one file" in r.stderr
    r = cli("export", "--run-dir", str(tmp_path), "--out", str(tmp_path / "x"), check=False)
    assert r.returncode == 2 and "no trained model" in r.stderr
    # an --out under a regular file: which file is in the way, not the training commands' "checkpoints are kept"
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "sub"       # (gguf's --out goes through the same check)
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(out), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'notes.txt'} is a file, so {out} cannot be made under it" in r.stderr
    assert "checkpoints are kept" not in r.stderr and (tmp_path / "notes.txt").read_text() == "mine"
    # a write that fails for the system's reasons: an export's own way out
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(tmp_path / ("x" * 300)), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "File name too long" in r.stderr, r.stderr
    assert "checkpoints are kept" not in r.stderr and "export again (the run directory is unchanged" in r.stderr


@pytest.mark.slow
def test_export_without_stage_refuses_a_model_that_is_not_a_chat_model(run, tmp_path):
    """The newest current model is pretrain's (here sft ran, then its final/ went missing): `chat` refuses it,
    and export, which would ship it under the run's name, says so and exports nothing unless --stage names it."""
    import shutil
    rd = tmp_path / "run"
    shutil.copytree(run[0], rd, ignore=shutil.ignore_patterns("step-*"))
    shutil.copytree(rd / "pretrain" / "final", rd / "sft" / "final")
    record_stage(rd, "sft", reads=["tokenizer", "pretrain"])
    shutil.rmtree(rd / "sft" / "final")
    r = cli("export", "--run-dir", str(rd), "--out", str(tmp_path / "hf"), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"nothing exported: the newest current model in {rd} is pretrain, not a chat model" in r.stderr
    assert "sft passed over" in r.stderr and "--stage pretrain" in r.stderr and not (tmp_path / "hf").exists()
    # pretrain-only runs were checked with --stage pretrain above; an sft model is exported without one
    shutil.copytree(rd / "pretrain" / "final", rd / "sft" / "final")
    r = cli("export", "--run-dir", str(rd), "--out", str(tmp_path / "hf"))
    assert "exported sft model" in r.stderr


@pytest.mark.slow
def test_export_never_deletes_what_it_did_not_write(run, tmp_path):
    rd, _ = run
    # a folder of the user's that happens to hold a config.json: refused, untouched (before: deleted, exit 0)
    mine = tmp_path / "my_model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "notes.txt").write_text("my notes")
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(mine), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not written by `zero-chatgpt export`" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    # an earlier export is replaced; an export with a file added to it is not
    out = tmp_path / "hf"
    cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(out))
    first = (out / ".zero-chatgpt-export.json").read_text()
    cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(out))
    assert (out / "model.safetensors").exists() and (out / ".zero-chatgpt-export.json").read_text() == first
    (out / "README.md").write_text("my model card")
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(out), check=False)
    assert r.returncode == 2 and "files export did not write: README.md" in r.stderr
    assert (out / "README.md").read_text() == "my model card"
    # an empty folder is fine; a file is one line; nothing is left beside
    (tmp_path / "empty").mkdir()
    cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_text("x")
    r = cli("export", "--run-dir", str(rd), "--stage", "pretrain", "--out", str(tmp_path / "file.bin"), check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is a file" in r.stderr
    assert not [p for p in tmp_path.iterdir() if "tmp-export" in p.name or "old-export" in p.name]


def test_stage_names_and_limits_are_checked(run):
    rd, _ = run
    for args in (["export", "--stage", "nosuch", "--out", "x"], ["chat", "--stage", "nosuch"],
                 ["chat", "--max-new-tokens", "-1"], ["chat", "--max-new-tokens", "0"]):
        r = cli(args[0], "--run-dir", str(rd), *args[1:], check=False)
        assert r.returncode == 2 and "zero-chatgpt nosuch" not in r.stderr, r.stderr
        assert "invalid choice: 'nosuch'" in r.stderr or "must be >= 1" in r.stderr
