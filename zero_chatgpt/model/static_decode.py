"""The generator's compiled decode step: `generate(..., compile=True)`.

Eager decoding of a small model is dispatch-bound: a step is ~20 tensor calls per layer, each a
Python call and an aten dispatch of about a microsecond, as much as the arithmetic (bench/generate.py).
One torch.compile'd graph per step removes that: Inductor fuses the norms, RoPE, softmax and SwiGLU
into a few C++ loops around the matmuls. A graph needs static shapes, so

* the KV cache is the generator's KVCache allocated at a bucketed length (`cache_length`: calls of
  similar lengths share one compiled graph), and every step attends to all of its slots through an
  additive mask (0 for a filled slot that is not padding, -inf otherwise), kept by the caller;
* the new token's own key and value join the softmax as one more score instead of being written into
  the cache inside the graph (a graph that writes into its input cache made Inductor copy the cache:
  slower than eager); `decode_step` writes them into their slot after the step, one copy per tensor.

The maths is the blocks' own inference path (transformer.block_qkv, block_out); only the attention is
written out, as a softmax over [cached slots, the new token]. Finished rows stay in the batch (a
different batch size is a different graph). The first call for a new (batch, cache length, dtype)
compiles (seconds); later calls in the process reuse it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zero_chatgpt.model.transformer import KVCache, Transformer, block_out, block_qkv, rms_norm

# Cache lengths are rounded up to a multiple of this: one compiled graph serves every call whose prompt +
# new tokens fall in the same bucket, at the price of attending to up to this many empty (masked) slots.
SLOT_BUCKET = 64


def cache_length(total: int, limit: int) -> int:
    """The cache length a compiled decode uses for `total` positions: rounded up to SLOT_BUCKET, at most `limit`."""
    return max(total, min(limit, -(-total // SLOT_BUCKET) * SLOT_BUCKET))


def _step(tok, pos, slots, K, V, weights, embed, norm, head, cos_t, sin_t, heads: tuple[int, int, int], eps: float):
    """One token per row against a static cache. tok, pos (B, 1); slots (B, 1, 1, S) additive; K, V
    (layers, B, Hk, S, D). Returns the (B, V) logits and the new keys / values (layers, B, Hk, 1, D)."""
    H, Hk, D = heads
    B = tok.shape[0]
    x = F.embedding(tok[:, 0], embed)                                   # (B, C)
    cos, sin = cos_t[pos][:, :, None], sin_t[pos][:, :, None]            # (B, 1, 1, D)
    scale = 1.0 / math.sqrt(D)
    keys, values = [], []
    for i, w in enumerate(weights):
        q, k, v = block_qkv(x, w, cos, sin, 1, heads, eps)              # (B, H, 1, D), (B, Hk, 1, D)
        q = q.reshape(B, Hk, H // Hk, D)                                  # query heads grouped by their kv head
        cached = torch.einsum("bgrd,bgsd->bgrs", q, K[i]) * scale + slots
        own = (q * k).sum(-1, keepdim=True) * scale
        p = torch.cat([cached, own], dim=-1).softmax(-1)
        y = torch.einsum("bgrs,bgsd->bgrd", p[..., :-1], V[i]) + p[..., -1:] * v
        x = block_out(x, y.reshape(B, H * D), w, eps)
        keys.append(k)
        values.append(v)
    return rms_norm(x, norm, eps) @ head, torch.stack(keys), torch.stack(values)


_compiled: dict[str, object] = {}


def _compiled_step(device_type: str):
    if device_type not in _compiled:
        # On CPU the C++ wrapper calls the kernels without a Python frame per kernel (measured ~15 % faster per
        # step at batch 8 than Inductor's Python wrapper, for a longer first compile). Each new shape compiles
        # anew, up to torch._dynamo's recompile limit; past it the step runs eagerly (same results, slower).
        options = {"cpp_wrapper": True} if device_type == "cpu" else {}
        _compiled[device_type] = torch.compile(_step, fullgraph=True, dynamic=False, options=options)
    return _compiled[device_type]


def empty_slots(cache: KVCache, filled: torch.Tensor) -> torch.Tensor:
    """The additive slot mask (B, 1, 1, S) for a cache whose first filled.shape[1] slots hold the prompts:
    0 where `filled` (B, L) is non-zero, -inf elsewhere (padding, and every slot not yet written)."""
    B, L = filled.shape
    slots = torch.full((B, 1, 1, cache.max_len), float("-inf"), dtype=cache.k.dtype, device=cache.k.device)
    slots[:, 0, 0, :L].masked_fill_(filled != 0, 0.0)
    return slots


def decode_step(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                cache: KVCache) -> torch.Tensor:
    """Feed one token per row (tokens, positions: (B, 1)) through the compiled step, within
    model.fused_for_inference(); write its keys / values into the cache's next slot and open that slot in
    `slots`. Returns the fp32 logits (B, vocab)."""
    cfg = model.config
    weights = [layer.inference_w for layer in model.model.layers]
    logits, k, v = _compiled_step(tokens.device.type)(
        tokens, positions, slots, cache.k, cache.v, weights, model.model.embed_tokens.weight,
        model.model.norm.weight, model.head_w, model.rope_cos, model.rope_sin,
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), cfg.rms_norm_eps)
    p = cache.pos
    cache.k[:, :, :, p:p + 1].copy_(k)
    cache.v[:, :, :, p:p + 1].copy_(v)
    slots[..., p] = 0.0
    cache.pos += 1
    return logits if logits.dtype == torch.float32 else logits.float()
