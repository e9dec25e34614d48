"""`zero-chatgpt plan`: FLOPs are the model's own formula, memory is checked against a measured run, a stage
that does not fit names the key to change and the value that fits."""
import json
import re
import subprocess
import sys
import textwrap

import pytest

from runs import zc
from zero_chatgpt.core import config
from zero_chatgpt.model.transformer import model_config_from
from zero_chatgpt.train.plan import plan


def test_flops_are_the_models_formula():
    cfg = config.load_preset("seed-0.1b")
    res = plan(cfg, gpus=8, gpu="H100", mfu=0.4)
    m = model_config_from(cfg.model, cfg.tokenizer.vocab_size)
    d, i, layers, vocab, seq = 512, 2752, 24, cfg.tokenizer.vocab_size, 1024
    n = layers * (4 * d * d + 3 * d * i + 2 * d) + d + vocab * d        # untied: the head, not the embedding
    assert res["flops_per_token"] == m.flops_per_token(seq) == 6 * n + 12 * layers * d * seq / 2
    p = res["stages"]["pretrain"]
    assert p["tokens"] == 19000 * 524288 and p["flops"] == m.flops_per_token(seq) * p["tokens"]
    assert p["seconds"] == pytest.approx(p["flops"] / (989e12 * 0.4 * 8))
    assert res["params"] == m.num_params()


def test_a_stage_that_does_not_fit_names_the_key_and_the_value_that_fits():
    cfg = config.load_preset("gpu-0.5b")
    res = plan(cfg, gpus=8, gpu="RTX 4090")
    misfits = {k: v["fix"] for k, v in res["stages"].items() if not v["fits"]}
    assert "pretrain" in misfits, res["stages"]["pretrain"]
    for stage, fix in misfits.items():
        m = re.match(r"--set (\S+)=(\S+)", fix)
        assert m, fix
        fixed = plan(config.apply_overrides(cfg, [f"{m[1]}={m[2]}"]), gpus=8, gpu="RTX 4090")
        assert fixed["stages"][stage]["fits"], (stage, fix, fixed["stages"][stage]["memory_gb"])
    # the same preset on a card with more memory fits as it is
    assert all(s["fits"] for s in plan(cfg, gpus=8, gpu="H100")["stages"].values())


# Peak RSS by sampling the process's current RSS: ru_maxrss would not do, since a child inherits its parent's
# high-water mark at fork (a pytest worker's gigabytes), so its own peak may never show.
MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import psutil
    import torch
    from zero_chatgpt.model.losses import lm_loss
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    from zero_chatgpt.train.plan import activation_bytes, state_bytes
    h, i, L, V, rows, seq = 512, 1408, 4, 8192, 4, 1024
    small = ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                        num_key_value_heads=1, max_position_embeddings=seq)
    ids = torch.randint(0, V, (rows, seq))
    lm_loss(Transformer(small), ids[:1, :16], ids[:1, :16])[0].backward()    # load the kernels first
    me, peak, done = psutil.Process(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            time.sleep(0.002)
    base = me.memory_info().rss
    threading.Thread(target=sample, daemon=True).start()
    cfg = ModelConfig(vocab_size=V, hidden_size=h, intermediate_size=i, num_hidden_layers=L, num_attention_heads=8,
                      num_key_value_heads=8, max_position_embeddings=seq)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        lm_loss(model, ids, ids)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    done.set()
    peak = peak[0] - base
    est = sum(state_bytes(cfg.num_params(), "adamw").values()) + activation_bytes(cfg, rows, seq, bf16=False)
    print(json.dumps({"measured": peak, "estimate": est}))
""")


@pytest.mark.slow
def test_memory_estimate_is_within_a_quarter_of_a_measured_training_step():
    """Two fp32 AdamW steps on CPU of a 21M-parameter model, 4 x 1024 tokens: the peak RSS above the process's
    RSS before the model existed, against weights + gradients + moments + activations as the plan counts them."""
    r = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert 0.75 <= got["estimate"] / got["measured"] <= 1.25, got


@pytest.mark.slow
def test_the_command_prints_the_table_and_json_and_refuses_an_unknown_card(tmp_path):
    r = zc("plan", "--preset", "seed-0.1b", "--run-dir", tmp_path / "run", "--gpus", "2", "--gpu", "A40")
    assert r.returncode == 0, r.stderr
    assert "2 x A40" in r.stderr and "pretrain" in r.stderr and "fits 48 GB" in r.stderr
    assert not (tmp_path / "run").exists()                  # it only reads
    r = zc("plan", "--preset", "seed-0.1b", "--run-dir", tmp_path / "run", "--json")
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["gpu"] == "H100" and set(res["stages"]) == {"pretrain", "sft", "rm", "ppo", "dpo", "grpo"}
    r = zc("plan", "--preset", "seed-0.1b", "--run-dir", tmp_path / "run", "--gpu", "Z9000")
    assert r.returncode == 2 and "unknown card" in r.stderr and "H100" in r.stderr
