"""The model against transformers' LlamaForCausalLM, the KV cache, padding, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: E402 - a dev extra (make test installs it): never skipped

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import config
from zero_chatgpt.model.losses import lm_loss
from zero_chatgpt.model.transformer import KVCache, ModelConfig, Transformer, model_config_from
from zero_chatgpt.train.loop import LoopSettings, lr_at


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6)
    base.update(kw)
    return ModelConfig(**base)


def hf_twin(model: Transformer):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_dict())).eval()
    hf.load_state_dict(model.state_dict())
    return hf


@pytest.mark.parametrize("kw", [dict(), dict(num_key_value_heads=4, tie_word_embeddings=True)])
def test_names_shapes_and_logits_match_transformers(kw):
    torch.manual_seed(0)
    m = Transformer(tiny(**kw)).eval()
    hf = hf_twin(m)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs
    x = torch.randint(0, 211, (3, 17))
    am = torch.ones(3, 17, dtype=torch.long)
    am[1, :6] = 0
    am[2, :11] = 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (m(x) - hf(x).logits).abs().max() < 1e-5
        a, b = m(x, position_ids=pos, attention_mask=am), hf(x, attention_mask=am, position_ids=pos).logits
        assert (a - b)[am.bool()].abs().max() < 1e-5


def test_left_padding_equals_unpadded_and_cache_equals_full_forward():
    torch.manual_seed(1)
    m = Transformer(tiny()).eval()
    x = torch.randint(0, 211, (1, 12))
    with torch.no_grad():
        full = m(x)
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), x], 1)
        am = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], 1).long()
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        assert (m(padded, position_ids=pos, attention_mask=am)[:, 5:] - full).abs().max() < 1e-5
        cache = KVCache(m.config, 1, 12)
        steps = [m(x[:, :7], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(7, 10)]
        steps.append(m(x[:, 10:], kv_cache=cache))   # a chunk of two against a filled cache
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-5
        with pytest.raises(ValueError, match="KV cache full"):
            m(x[:, :1], kv_cache=cache)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [dict(), dict(num_key_value_heads=4, tie_word_embeddings=True)])
def test_fused_inference_weights_give_the_same_logits_and_are_dropped_after(kw):
    torch.manual_seed(2)
    m = Transformer(tiny(**kw)).eval()
    hf = hf_twin(m)
    x = torch.randint(0, 211, (2, 9))
    with torch.no_grad():
        plain = m(x)
        with m.fused_for_inference():
            assert m.head_w is not None and m.model.layers[0].inference_w is not None
            with m.fused_for_inference():   # nested: still the same copies
                fused = m(x)
            cache = KVCache(m.config, 2, 9)
            steps = [m(x[:, :5], kv_cache=cache)] + [m(x[:, t:t + 1], kv_cache=cache) for t in range(5, 9)]
            stepped = torch.cat(steps, 1)
        assert (fused - plain).abs().max() < 1e-5 and (stepped - plain).abs().max() < 1e-5
        assert (fused - hf(x).logits).abs().max() < 1e-5
    assert m.head_w is None and all(b.inference_w is None for b in m.model.layers)
    with torch.enable_grad(), m.fused_for_inference():   # training keeps the parameters' own path
        assert m.head_w is None
        m(x).sum().backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_lm_loss_and_hidden():
    torch.manual_seed(2)
    m = Transformer(tiny()).eval()
    x = torch.randint(0, 211, (2, 9))
    labels = x.roll(-1, 1)
    labels[0, -3:] = -100
    with torch.no_grad():
        loss, n = lm_loss(m, x, labels)
        ref = F.cross_entropy(m(x).reshape(-1, 211), labels.reshape(-1), ignore_index=-100)
        assert n == 15 and abs(loss.item() - ref.item()) < 1e-5
        h = m(x, return_hidden=True)
        assert h.shape == (2, 9, 64) and torch.allclose(m.lm_head(h), m(x), atol=1e-6)


def test_init_is_documented_scale():
    torch.manual_seed(3)
    m = Transformer(tiny(num_hidden_layers=8))
    sd = m.state_dict()
    assert abs(sd["model.layers.0.self_attn.q_proj.weight"].std().item() - 0.02) < 0.002
    assert abs(sd["model.layers.0.mlp.down_proj.weight"].std().item() - 0.02 / 4) < 0.001
    assert torch.equal(sd["model.norm.weight"], torch.ones(64))


def test_presets_build_the_intended_sizes():
    seed = config.load_preset("seed-0.1b")
    c = model_config_from(seed.model, 32006)
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(c).parameters())
    assert n == c.num_params() and 155e6 < n < 162e6     # the seed's "~159M"
    assert c.hidden_size == 512 and c.intermediate_size == 2752 and c.num_hidden_layers == 24
    assert c.num_attention_heads == 16 and not c.tie_word_embeddings and c.rope_theta == 1e6
    demo = model_config_from(config.load_preset("demo").model, 4096)
    assert 1e6 < demo.num_params() < 8e6     # sized by measured loss per CPU-minute (presets/demo.toml)
    big = model_config_from(config.load_preset("gpu-0.5b").model, 32006)
    assert 4.5e8 < big.num_params() < 6e8 and big.num_key_value_heads == 4


def test_checkpoint_roundtrip_atomic_and_hf_folder(tmp_path):
    torch.manual_seed(4)
    for tie in (False, True):
        m = Transformer(tiny(tie_word_embeddings=tie)).eval()
        for step in (1, 2, 3):
            ckpt.save_checkpoint(tmp_path / str(tie), f"step-{step}", model_state=m.state_dict(), cfg=m.config,
                                 trainer_state={"step": step}, keep_last=2)
        assert [p.name for p in ckpt.list_checkpoints(tmp_path / str(tie))] == ["step-2", "step-3"]
        back = ckpt.load_model(tmp_path / str(tie) / "step-3")
        x = torch.randint(0, 211, (1, 8))
        with torch.no_grad():
            assert torch.equal(back(x), m(x))
        assert (back.lm_head.weight is back.model.embed_tokens.weight) == tie
    # what a kill mid-save leaves behind is cleaned; an interrupted final/ replacement restored
    d = tmp_path / "False"
    (d / ".tmp-step-4").mkdir()
    (d / "step-3").rename(d / ".old-step-3")
    ckpt.clean_partial(d)
    assert sorted(p.name for p in d.iterdir()) == ["step-2", "step-3"]
    assert ckpt.load_trainer_state(d / "step-3") == {"step": 3}
    # an HF save_pretrained folder is a checkpoint too
    hf = hf_twin(Transformer(tiny()))
    hf.save_pretrained(tmp_path / "hf")
    ours = ckpt.load_model(tmp_path / "hf")
    x = torch.randint(0, 211, (2, 8))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-5


def test_schedule():
    s = LoopSettings(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(55, s) == pytest.approx(0.55) and lr_at(99, s) == pytest.approx(0.1, abs=1e-3)
    w = LoopSettings(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, w) == 1.0 and lr_at(79, w) == 1.0 and lr_at(90, w) == pytest.approx(0.5)
    assert all(lr_at(i, s) >= 0.1 - 1e-9 for i in range(200)) and not math.isnan(lr_at(150, s))
