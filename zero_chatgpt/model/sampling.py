"""THE sampler: the generator (model/generate.py) and the server's engine (serve/engine.py) turn logits into
tokens and find stop strings through these functions only.

Sampling, in the order transformers applies it: repetition penalty (CTRL, Keskar et al.
2019, arXiv:1909.05858: divide positive logits / multiply negative ones of every token
already in the row), temperature, top-k, top-p (nucleus, Holtzman et al. 2019,
arXiv:1904.09751). temperature = 0 is greedy.
"""
from __future__ import annotations

import torch

# Below this temperature, sampling is greedy: logits / 1e-247 overflow fp32 to inf and the softmax to NaN
# (found by fuzzing the server), and any temperature this small picks the maximum anyway.
MIN_TEMPERATURE = 1e-4


def effective_temperature(t: float) -> float:
    return 0.0 if t < MIN_TEMPERATURE else t


def last_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of each row's last position."""
    logits = model.logits(hidden[:, -1])
    return logits if logits.dtype == torch.float32 else logits.float()


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, repetition_penalty: float,
                    temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Scores to sample from (fp32, (B, V)); -inf marks filtered tokens."""
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[:, -1] = False   # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return logits


def draw(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of softmax(scores) ((B, V) fp32, -inf = filtered): (B,) long.

    Inverse-CDF sampling: one uniform per row located by binary search in the cumulative
    probabilities. The same distribution as torch.multinomial, which on CPU costs more than a small
    model's whole decoding step (measured on 2 cores, a (64, 4096) batch: multinomial ~34 ms, this
    ~6 ms). A uniform in (0, 1] never lands on a zero-probability token: such a token's cumulative
    value equals its predecessor's, and the search returns the first index reaching the draw.
    """
    cum = scores.softmax(-1).cumsum_(-1)
    u = torch.rand(cum.shape[0], 1, generator=generator, device=cum.device)
    return torch.searchsorted(cum, (1.0 - u) * cum[:, -1:]).clamp_(max=cum.shape[1] - 1).squeeze(1)


def pick(scores: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of `scores` (from `process_logits`): drawn when temperature > 0, else the
    first maximum, as argmax picks it (which is 2.5x slower on CPU)."""
    return draw(scores, generator) if temperature > 0 else scores.max(-1).indices


def mark_seen(seen: torch.Tensor | None, tokens: torch.Tensor) -> None:
    """Record each row's new token (B,) in its seen-token mask (B, V), which the repetition penalty reads."""
    if seen is not None:
        seen.scatter_(1, tokens.view(-1, 1), True)


def cut_at_stop(text: str, stop_strings) -> tuple[str, bool]:
    """The text before the first of `stop_strings` it contains, and whether one was found."""
    hit = False
    for s in stop_strings:
        at = text.find(s)
        if at >= 0:
            text, hit = text[:at], True
    return text, hit
