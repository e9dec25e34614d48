"""The language model: LLaMA, in one file you can read in one sitting.

Architecture (Touvron et al. 2023, "LLaMA", arXiv:2302.13971):
  token embedding -> N x [RMSNorm -> attention (RoPE, grouped-query) -> residual,
                         RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head

* RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467), computed in fp32 as transformers does.
* RoPE (Su et al. 2021, arXiv:2104.09864), "rotate half" layout, theta configurable.
* SwiGLU MLP (Shazeer 2020, arXiv:2002.05202): down(silu(gate(x)) * up(x)).
* Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245) through
  `scaled_dot_product_attention`; no biases anywhere; tied or untied embeddings.

Parameter names and shapes are exactly those of transformers' `LlamaForCausalLM`
(`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`, ...,
`lm_head.weight`), so a state dict moves between the two with no renaming: our
checkpoints are HF folders, and HF Llama folders are our checkpoints.

`forward(..., kv_cache=...)` serves generation (model/generate.py): the cache is
preallocated once per batch, and each call writes its keys/values at
`kv_cache.pos` and attends to everything before.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from zero_chatgpt.core.settings import ModelSection, TokenizerSection


@dataclass
class ModelConfig(ModelSection):
    """Model shape: the [model] config section (its keys, defaults and help: core/settings.ModelSection) and
    what the tokenizer and the head add. Field names are those of transformers' `LlamaConfig`."""
    vocab_size: int = TokenizerSection.vocab_size
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    head: str = "lm"      # "lm": lm_head over the vocabulary (LlamaForCausalLM); "score": one scalar per
                          # position (LlamaForSequenceClassification, num_labels 1: reward models, critics)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if not self.num_key_value_heads:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {self.head!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")

    def to_hf_dict(self) -> dict:
        """A `config.json` that transformers loads as a LlamaConfig, with no custom code."""
        d = {"vocab_size": self.vocab_size, **asdict(self)}      # transformers' order: the vocabulary first
        head = d.pop("head")
        d.update(architectures=["LlamaForCausalLM" if head == "lm" else "LlamaForSequenceClassification"],
                 model_type="llama", hidden_act="silu",
                 attention_bias=False, attention_dropout=0.0, mlp_bias=False, head_dim=self.head_dim,
                 rope_scaling=None, torch_dtype="float32", use_cache=True, pretraining_tp=1)
        if head == "score":
            d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, tie_word_embeddings=False)
        return {k: v for k, v in d.items() if v is not None or k == "rope_scaling"}

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Read an HF LlamaConfig dict (extra keys ignored; unsupported features refused)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d.get('model_type')!r} is not a Llama model")
        scaling = d.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ValueError(f"rope_scaling {scaling!r} is not supported")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise ValueError("Llama checkpoints with biases are not supported")
        hd = d.get("head_dim")
        if hd is not None and hd != d["hidden_size"] // d["num_attention_heads"]:
            raise ValueError(f"head_dim {hd} != hidden_size / num_attention_heads is not supported")
        theta = d.get("rope_theta")
        if theta is None:   # transformers >= 5 keeps it under rope_parameters
            theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["rope_theta"] = float(theta)
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw["head"] = "score" if "LlamaForSequenceClassification" in (d.get("architectures") or []) else "lm"
        if kw["head"] == "score" and d.get("num_labels", 1) != 1:
            raise ValueError(f"num_labels {d.get('num_labels')}: only scalar (num_labels 1) score heads are supported")
        return cls(**kw)

    def num_params(self, embeddings: bool = True) -> int:
        h, i, L, v = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        out_head = h if self.head == "score" else 0 if self.tie_word_embeddings else v * h
        return L * per_layer + h + ((v * h + out_head) if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x non-embedding matmul params + lm_head + attention
        (Kaplan et al. 2020 / PaLM appendix B)."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.hidden_size
        attn = 12 * self.num_hidden_layers * self.hidden_size * seq_len / 2  # causal: half the scores
        return 6 * n + attn


def model_config_from(section: ModelSection, vocab_size: int, **extra) -> ModelConfig:
    """The [model] config section (+ the tokenizer's vocab size) as a ModelConfig."""
    return ModelConfig(**section.values(), vocab_size=vocab_size, **extra)


def _is_sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # The arithmetic below in one call: bit-identical in fp32, 4x fewer dispatches.
        return F.rms_norm(x, weight.shape, weight, eps)
    # fp32 statistics whatever the activation dtype (as transformers' LlamaRMSNorm).
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (length, head_dim) in fp32, layout [f0..f_{d/2-1}, f0..f_{d/2-1}];
    the sin table's first half is negated (see apply_rope)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    t = torch.arange(length, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    sin = emb.sin()
    sin[:, : d // 2].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: (B, T, heads, D); cos/sin_signed: (B or 1, T, 1, D).

    transformers' "rotate half" is x * cos + cat(-x2, x1) * sin. With the sign folded into the
    table, cat(-x2, x1) * sin == roll(x, D/2) * sin_signed exactly (negation is exact), in 4
    dispatches instead of 7: decoding a small model is dispatch-bound."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class KVCache:
    """Preallocated keys/values for every layer: (layers, B, kv_heads, max_len, head_dim).

    `pos` is how many positions are filled; a forward call with T new tokens writes
    positions [pos, pos+T) and then advances `pos` (after the last layer).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._k, self._v = self.k.unbind(0), self.v.unbind(0)   # per-layer views, taken once
        self.pos = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        kl, vl = self._k[layer], self._v[layer]
        kl.narrow(2, self.pos, T).copy_(k)
        vl.narrow(2, self.pos, T).copy_(v)
        return kl.narrow(2, 0, end), vl.narrow(2, 0, end)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (the generator drops finished answers); only the
        filled positions are copied."""
        self._k = self._v = ()            # the per-layer views would keep the old tensors alive meanwhile
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], len(rows), *old.shape[2:]))
            new[:, :, :, :self.pos] = old[:, rows, :, :self.pos]
            setattr(self, name, new)
        self._k, self._v = self.k.unbind(0), self.v.unbind(0)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.layer = cfg.num_attention_heads, cfg.num_key_value_heads, hd, layer
        self.q_proj = nn.Linear(h, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)

    def forward(self, x, cos, sin, mask, kv_cache: KVCache | None):
        B, T, _ = x.shape
        H, Hk, D = self.n_heads, self.n_kv, self.head_dim
        q = apply_rope(self.q_proj(x).view(B, T, H, D), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, Hk, D), cos, sin)
        v = self.v_proj(x).view(B, T, Hk, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if q.dtype != v.dtype:   # fp32 RoPE tables promote bf16 activations
            q, k = q.to(v.dtype), k.to(v.dtype)
        if kv_cache is not None:
            k, v = _cached(kv_cache, self.layer, k, v, q.dtype)
        if self.n_kv != self.n_heads:   # grouped-query: each kv head serves n_heads / n_kv query heads
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _cached(kv_cache: KVCache, layer: int, k: torch.Tensor, v: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Write this call's keys/values into the cache; all of the layer's keys/values so far, in `dtype`."""
    if k.dtype != kv_cache.k.dtype:
        k, v = k.to(kv_cache.k.dtype), v.to(kv_cache.v.dtype)
    k, v = kv_cache.update(layer, k, v)
    if k.dtype != dtype:
        k, v = k.to(dtype), v.to(dtype)
    return k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class InferenceWeights(NamedTuple):
    """One block's inference copy of its weights (Transformer.fused_for_inference); matrices (in, out)."""
    qkv: torch.Tensor          # [q; k; v] projections concatenated: one matmul instead of three
    o: torch.Tensor
    gate_up: torch.Tensor      # [gate; up]: one matmul instead of two
    down: torch.Tensor
    norm1: torch.Tensor        # the two RMSNorms' weights, held here so that a step reads no module attribute
    norm2: torch.Tensor


class Block(nn.Module):
    inference_w: InferenceWeights | None = None    # set by Transformer.fused_for_inference; None while training

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps, self.layer = cfg.rms_norm_eps, layer
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, x, cos, sin, mask, kv_cache):
        if self.inference_w is not None:
            return self.infer(x, cos, sin, mask, kv_cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def infer(self, x, cos, sin, mask, kv_cache):
        """forward's computation on the inference copy of the weights (block_qkv, block_out).

        Decoding a small model is dispatch-bound: every Python call, module attribute read and aten
        dispatch costs about a microsecond, as much as a decode step's arithmetic per op (bench/generate.py).
        So: q, k and v in one matmul and one RoPE call; grouped-query attention by the kernel (enable_gqa)
        instead of copying keys; weights read from a tuple, not from modules."""
        w = self.inference_w
        B, T, C = x.shape
        H, Hk, _ = self.heads
        x = x.reshape(B * T, C)
        q, k, v = block_qkv(x, w, cos, sin, T, self.heads, self.eps)
        if kv_cache is not None:
            k, v = _cached(kv_cache, self.layer, k, v, q.dtype)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=Hk != H)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hk != H)
        return block_out(x, y.transpose(1, 2).reshape(B * T, -1), w, self.eps).view(B, T, C)


def block_qkv(x: torch.Tensor, w: InferenceWeights, cos, sin, T: int, heads: tuple[int, int, int], eps: float):
    """A block's attention input on its inference weights: x (B*T, C) -> q (B, H, T, D), k and v (B, Hk, T, D),
    RoPE applied (one matmul for q, k and v; one RoPE call for q and k)."""
    H, Hk, D = heads
    qkv = (rms_norm(x, w.norm1, eps) @ w.qkv).view(-1, T, H + 2 * Hk, D)
    qk = apply_rope(qkv[:, :, :H + Hk], cos, sin)
    if qk.dtype != qkv.dtype:   # fp32 RoPE tables promote bf16 activations
        qk = qk.to(qkv.dtype)
    return qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2), qkv[:, :, H + Hk:].transpose(1, 2)


def block_out(x: torch.Tensor, y: torch.Tensor, w: InferenceWeights, eps: float) -> torch.Tensor:
    """The rest of a block on its inference weights: the residual x (N, C) plus the attention output y (N, H*D)
    projected, then plus the MLP of that. The residual is a separate add, not folded into the matmul (addmm):
    addmm rounds differently, and sampled answers, hence the reward model and RL trained on them, would change
    (docs/experiments.md, 2026-12-07)."""
    x = x + y @ w.o
    gate, up = (rms_norm(x, w.norm2, eps) @ w.gate_up).chunk(2, dim=-1)
    return x + F.silu(gate).mul_(up) @ w.down


class Backbone(nn.Module):
    """The `model.` prefix of LlamaForCausalLM: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    head_w: torch.Tensor | None = None   # lm_head weight, transposed, within fused_for_inference

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if cfg.head == "score":
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        # Not saved: derived from the config (and absent from HF checkpoints).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialization: N(0, initializer_range) for embeddings and matrices (as LLaMA /
        transformers), with the two projections that write into the residual stream
        (o_proj, down_proj) scaled by 1/sqrt(2 * layers) so the residual's variance does
        not grow with depth (GPT-2, Radford et al. 2019, section 2.3); norms start at 1."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, resid_std)
            else:
                p.normal_(0.0, std)

    @contextmanager
    def fused_for_inference(self):
        """Within: every matmul runs on an inference copy of its weights, [q; k; v] and [gate; up]
        concatenated (one matmul where there were three and two) and, on CPU, transposed to
        (in, out) contiguous (measured 1.5-2x faster than nn.Linear's (out, in) layout for the
        few-row matmuls of decoding), and every block runs Block.infer, its flat inference path (a small
        model's decoding is dispatch-bound: see bench/generate.py). A boolean attention mask is made
        additive once per call rather than in every layer. The copies are built at entry from the current weights and dropped at
        exit, so they never go stale and cost memory only while generating. Only without
        autograd, and not for sharded (FSDP) parameters; nested use is a no-op."""
        if torch.is_grad_enabled() or self.head_w is not None or self.config.head != "lm" or \
                _is_sharded(self.lm_head.weight):
            yield self
            return

        def t(w: torch.Tensor) -> torch.Tensor:
            return w.t().contiguous() if w.device.type == "cpu" else w.t()

        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            layer.inference_w = InferenceWeights(
                t(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])), t(a.o_proj.weight),
                t(torch.cat([m.gate_proj.weight, m.up_proj.weight])), t(m.down_proj.weight),
                layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach())
        self.head_w = t(self.lm_head.weight)
        try:
            yield self
        finally:
            for layer in self.model.layers:
                layer.inference_w = None
            self.head_w = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """lm_head(hidden), on the inference copy of the weights within fused_for_inference."""
        return hidden @ self.head_w if self.head_w is not None else self.lm_head(hidden)

    def _rope(self, position_ids: torch.Tensor | None, start: int, T: int, checked: bool = False):
        """cos / signed sin for positions, shaped (B or 1, T, 1, head_dim) for (B, T, heads, D)."""
        if position_ids is None:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
            return cos[None, :, None], sin[None, :, None]
        if not checked and int(position_ids.max()) >= self.rope_cos.shape[0]:
            raise ValueError(f"position {int(position_ids.max())} >= max_position_embeddings "
                             f"{self.rope_cos.shape[0]}")
        return self.rope_cos[position_ids][:, :, None], self.rope_sin[position_ids][:, :, None]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False, output=None):
        """Logits (B, T, vocab) (a score model: values (B, T)); the final normed hidden states
        (B, T, hidden) with `return_hidden=True`; or `output(self, hidden)` — what a stage's loss
        needs, computed inside forward so that DDP, FSDP and torch.compile see it whole (model/losses.py:
        LMLoss, TokenLogProbs, ScalarValues). The model gives hidden states and heads; the stage
        gives its loss, so no stage's options pass through here.

        input_ids (B, T). position_ids (B, T): default kv_cache.pos + arange(T); pass them with
        left padding. attention_mask (B, S): 1 for real tokens, 0 for padding, covering every
        cached position plus these T (S = kv_cache.pos + T), or just the T without a cache; or a
        ready (B, 1, T, S) mask, used as is: boolean (True = may attend) or additive (0 / -inf, the
        activations' dtype).
        """
        B, T = input_ids.shape
        start = kv_cache.pos if kv_cache is not None else 0
        x = self.model.embed_tokens(input_ids)
        # With a cache no longer than the RoPE tables, positions (< cache length) are in range.
        checked = kv_cache is not None and kv_cache.max_len <= self.rope_cos.shape[0]
        cos, sin = self._rope(position_ids, start, T, checked)
        mask = None   # None = plain causal (or, for one token against a cache, attend to all)
        if attention_mask is not None and attention_mask.dim() == 4:
            # (B, 1, T, S), built by the caller (the generator, the server)
            mask = attention_mask if attention_mask.dtype == torch.bool or attention_mask.is_floating_point() \
                else attention_mask.bool()
        elif attention_mask is not None or (start > 0 and T > 1):
            S = start + T
            q_pos = torch.arange(start, S, device=input_ids.device)[:, None]
            k_pos = torch.arange(S, device=input_ids.device)[None, :]
            mask = (k_pos <= q_pos)[None, None]                                  # (1, 1, T, S)
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, :S].bool()
                # A left-pad query row would have nothing to attend to (NaN); let it see
                # itself. Its output is never used.
                mask = mask | (k_pos == q_pos)[None, None]
        if self.head_w is not None:   # fused_for_inference: the blocks' flat inference path, no module calls
            if mask is not None and mask.dtype == torch.bool:
                # additive, once: the attention kernel would otherwise convert a boolean mask in every layer
                mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
            for layer in self.model.layers:
                x = layer.infer(x, cos, sin, mask, kv_cache)
        else:
            for layer in self.model.layers:
                x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.model.norm(x)
        if output is not None:
            return output(self, x)
        if return_hidden:
            return x
        if self.config.head == "score":
            return self.score(x).squeeze(-1)
        return self.logits(x)
