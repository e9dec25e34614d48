"""THE generator: evaluation, RL rollouts, chat and the server all sample through `generate`.

Batched with left padding: prompts of different lengths are right-aligned, padding is
masked out of attention, and each row's positions count only its real tokens (so a
padded row computes exactly what it would alone). Keys and values live in one cache
preallocated for prompt + max_new_tokens (model.KVCache), so a decode step is one
forward of B tokens with no reallocation, on the model's inference copy of its weights
(Transformer.fused_for_inference: fewer, faster matmuls; built per call, so never stale).

With compile=True each decode step is one torch.compile'd graph over a static cache instead
(model/static_decode.py): faster per token once compiled, for long generations.

Sampling (repetition penalty, temperature, top-k, top-p, greedy at temperature 0): model/sampling.py.

A row stops at any of `stop_ids` (the stop token is kept as the row's last token: RL needs
its log-probability) or when its decoded text contains one of `stop_strings` (needs
`tokenizer`); `Generation.text` is then the text before the stop string.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from zero_chatgpt.model.sampling import cut_at_stop, effective_temperature, last_logits, mark_seen, pick, process_logits
from zero_chatgpt.model.static_decode import cache_length, decode_step, empty_slots
from zero_chatgpt.model.transformer import KVCache


@dataclass
class Generation:
    tokens: list[int]                 # new tokens (with the stop token, if one ended the row)
    logprobs: list[float] | None      # per new token, see generate(return_logprobs=...)
    finish_reason: str                # "stop" | "length"
    text: str | None = None           # decoded new text without stop token / stop string (needs tokenizer)


def answer_ended(tokens: Sequence[int], stop_ids) -> bool:
    """Whether an answer ended by itself: its last token is a stop token (the generator keeps it). The one
    definition of "the answer ended" (eos_rate, RL's missing-eos penalty, the reward model's input)."""
    return bool(tokens) and tokens[-1] in stop_ids


# Finished rows are dropped from the batch once the live ones are at most this share of it: each drop
# copies the cache, so not at every finish (the share makes the copies a geometric series).
COMPACT_AT = 0.75


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (), tokenizer=None,
             stream: Callable[[int, int], None] | None = None, return_logprobs: bool = False,
             generator: torch.Generator | None = None, compile: bool = False) -> list[Generation]:
    """Continue each prompt (a list of token ids) with up to max_new_tokens tokens.

    return_logprobs: the log-probability of each sampled token under the model's
    temperature-scaled distribution, before top-k/top-p/repetition filtering (the policy
    probability RL needs); with temperature 0, under the plain softmax.
    stream(index, token_id) is called for every new token of every row, as it is produced.
    generator: a torch.Generator (on the model's device) for reproducible sampling.
    compile: decode through one torch.compile'd graph per step (model/static_decode.py): faster per token
    once compiled, but the first call for a new batch size or length bucket compiles for seconds, and
    finished rows stay in the batch. Worth it for long generations; the same tokens as eager up to
    floating-point rounding.
    """
    with torch.inference_mode(), model.fused_for_inference():
        return _generate(model, prompts, max_new_tokens=max_new_tokens,
                         temperature=effective_temperature(temperature), top_k=top_k,
                         top_p=top_p, repetition_penalty=repetition_penalty, stop_ids=stop_ids,
                         stop_strings=stop_strings, tokenizer=tokenizer, stream=stream,
                         return_logprobs=return_logprobs, generator=generator,
                         compiled=compile and model.head_w is not None)


def _generate(model, prompts, *, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop_ids,
              stop_strings, tokenizer, stream, return_logprobs, generator, compiled) -> list[Generation]:
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode with")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    cfg = model.config
    B = len(prompts)
    lens = [len(p) for p in prompts]
    L = max(lens)
    if L >= cfg.max_position_embeddings:
        raise ValueError(f"prompt of {L} tokens leaves no room under max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    max_new = max(0, min(max_new_tokens, cfg.max_position_embeddings - L))
    total = L + max_new

    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, L - len(p):] = 1
    mask[:, L:] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = min(lens) != L
    positions = (mask[:, :L].cumsum(-1) - 1).clamp(min=0)
    next_pos = positions[:, -1:] + 1

    stop_set = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device) if stop_ids else None
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask[:, :L].bool())

    cache = KVCache(cfg, B, cache_length(total, cfg.max_position_embeddings) if compiled else total,
                    device=device, dtype=dtype)
    hidden = model(ids, position_ids=positions if padded else None,
                   attention_mask=mask[:, :L] if padded else None, kv_cache=cache, return_hidden=True)
    logits = last_logits(model, hidden)
    slots = empty_slots(cache, mask[:, :L]) if compiled else None

    out_tokens: list[list[int]] = [[] for _ in range(B)]
    out_logprobs: list[list[float]] | None = [[] for _ in range(B)] if return_logprobs else None
    finish = ["length"] * B
    live = list(range(B))            # the prompt index of each batch row
    alive = torch.ones(B, dtype=torch.bool, device=device)
    alive_list = [True] * B
    n_alive = B
    # Decode steps attend through an additive mask made once (0 / -inf: each step's is a view of it); the
    # attention kernel would otherwise convert a boolean one in every layer of every step.
    mask4 = None if compiled else \
        torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(mask == 0, float("-inf"))[:, None, None]
    texts: list[str | None] = [None] * B
    max_stop_len = max((len(s) for s in stop_strings), default=0)

    for t in range(max_new):
        scores = process_logits(logits, seen, repetition_penalty, temperature, top_k, top_p)
        nxt = pick(scores, temperature, generator)
        if return_logprobs:
            base = logits / temperature if temperature > 0 else logits
            lp = base.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1).tolist()
        if n_alive < len(live):
            nxt = torch.where(alive, nxt, torch.zeros_like(nxt))
        hit_stop = torch.isin(nxt, stop_set) & alive if stop_set is not None else None
        nxt_list = nxt.tolist()
        hit_list = hit_stop.tolist() if hit_stop is not None else None
        for c, i in enumerate(live):
            if not alive_list[c]:
                continue
            tok = nxt_list[c]
            out_tokens[i].append(tok)
            if out_logprobs is not None:
                out_logprobs[i].append(lp[c])
            if stream is not None:
                stream(i, tok)
            if hit_list is not None and hit_list[c]:
                finish[i], alive_list[c] = "stop", False
            elif stop_strings and cut_at_stop(tokenizer.decode(out_tokens[i][-(max_stop_len + 8):]), stop_strings)[1]:
                finish[i], alive_list[c] = "stop", False
        if not any(alive_list) or t == max_new - 1:
            break
        if n_alive != sum(alive_list):   # rebuild the device-side flags only when a row finished
            n_alive = sum(alive_list)
            if n_alive <= COMPACT_AT * len(live) and not compiled:
                # Finished rows leave the batch: answers end at very different lengths (the demo's eval
                # answers: mean 16 tokens, a few run to the limit), and a decode step costs about its rows.
                keep = [c for c, a in enumerate(alive_list) if a]
                rows_t = torch.tensor(keep, device=device)
                cache.keep_rows(rows_t)
                nxt, next_pos, mask4 = nxt[rows_t], next_pos[rows_t], mask4[rows_t]
                seen = seen[rows_t] if seen is not None else None
                live, alive_list = [live[c] for c in keep], [True] * len(keep)
            alive = torch.tensor(alive_list, device=device)
        mark_seen(seen, nxt)
        # One new token per row: it may attend to every cached position that is not padding,
        # so the (B, 1, 1, S) mask is a view of the padding mask; no causal part is needed.
        if compiled:
            logits = decode_step(model, nxt[:, None], next_pos, slots, cache)
        else:
            hidden = model(nxt[:, None], position_ids=next_pos if padded else None,
                           attention_mask=mask4[..., :L + t + 1] if padded else None, kv_cache=cache,
                           return_hidden=True)
            logits = last_logits(model, hidden)
        next_pos = next_pos + 1

    if tokenizer is not None:
        stops = set(stop_ids)
        for i in range(B):
            toks = out_tokens[i]
            if toks and toks[-1] in stops and finish[i] == "stop":
                toks = toks[:-1]
            texts[i] = cut_at_stop(tokenizer.decode(toks), stop_strings)[0]
    return [Generation(out_tokens[i], out_logprobs[i] if out_logprobs is not None else None, finish[i], texts[i])
            for i in range(B)]
