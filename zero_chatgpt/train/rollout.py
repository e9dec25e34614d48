"""Sampling answers for RL and preference data, through the one generator.

Rollouts sample at a temperature with no top-k, top-p or repetition filter: with a filter, the
log-probabilities the generator returns are not those of the distribution the tokens came from, and
the first PPO ratio is not 1 (rlhf.md). Sampling is seeded per call, so a rerun (or a resume) draws
the same answers from the same model.
"""
from __future__ import annotations

import torch

from zero_chatgpt.core.console import progress
from zero_chatgpt.model.generate import Generation, generate


def sample(model, tok, prompts: list[list[int]], *, temperature: float, max_new_tokens: int, seed: int,
           batch_size: int = 64, return_logprobs: bool = False, desc: str = "sample", show_progress: bool = True
           ) -> list[Generation]:
    """One sampled answer per prompt (in prompt order), at `temperature`, stopping at <|im_end|>; prompts
    longer than the context leaves room for keep their end (`prompt_limit`)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(int(seed))
    prompts = [list(p)[-prompt_limit(model, max_new_tokens):] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Generation | None] = [None] * len(prompts)
    bar = progress(total=len(prompts), desc=desc, unit="answer", disable=not show_progress)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gens = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                        stop_ids=tok.stop_ids, tokenizer=tok, return_logprobs=return_logprobs, generator=g)
        for i, gen in zip(idx, gens):
            out[i] = gen
        bar.update(len(idx))
    bar.close()
    return out   # type: ignore[return-value]


def prompt_limit(model, max_new_tokens: int) -> int:
    """The most prompt tokens that leave max_new_tokens of room in the model's context."""
    return max(8, model.config.max_position_embeddings - max_new_tokens)

