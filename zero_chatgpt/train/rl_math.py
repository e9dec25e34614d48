"""The pieces of PPO and GRPO that decide whether RL helps or hurts, each small and tested on its own
(tests/train/test_rl.py; "The N+ Implementation Details of RLHF with PPO", Huang et al. 2024):

* `masked_whiten`: advantages normalized over the real tokens of the batch only (padding excluded);
* `gae`: generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438) over answer tokens;
* `AdaptiveKL`: the KL coefficient controller of Ziegler et al. 2019 (arXiv:1909.08593), which steers the
  per-token KL penalty toward a target instead of fixing it (the seed fixed it and drifted);
* `group_advantages`: GRPO's per-prompt normalization of k samples' rewards (Shao et al. 2024,
  arXiv:2402.03300), no critic;
* `clipped_policy_loss` / `clipped_value_loss`: PPO's ratio clip and value clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1 (unbiased variance, as TRL); 0 elsewhere."""
    mean = masked_mean(x, mask)
    centered = x - mean
    n = mask.sum().clamp(min=2)
    var = ((centered ** 2) * mask).sum() / (n - 1)
    out = centered * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), (B, T) each, for per-token rewards and values over answer tokens (mask 1).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero past
    each row's last answer token; returns = A + V (the critic's targets)."""
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m
        adv[:, t] = last
        next_value = values[:, t] * m + next_value * (1 - m)   # a padded position passes the next value through
    return adv, (adv + values) * mask


@dataclass
class AdaptiveKL:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)  (Ziegler et al. 2019)."""
    beta: float
    target: float | None = None     # None: a fixed coefficient
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, d: dict) -> None:
        self.beta = float(d["beta"])


SCALES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4, scale: str = "group",
                     batch_std: torch.Tensor | float | None = None) -> torch.Tensor:
    """GRPO: rewards (n*k,) of k samples per prompt (grouped consecutively) → r - its group's mean, divided by

    "group"  the group's std (DeepSeekMath, Shao et al. 2024);
    "batch"  the whole rollout's std (`batch_std`, all ranks; default this tensor's): "Lite PPO", Liu et al.
             2025, arXiv:2508.08221. A group whose answers score almost alike keeps a small advantage instead
             of having its noise blown up to unit size; on the demo this is what let the reference reward
             raise held-out char_f1 (presets/demo.toml);
    "none"   nothing (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783: the std adds a per-question difficulty bias).
    """
    r = rewards.view(-1, k)
    centred = r - r.mean(1, keepdim=True)
    if scale == "group":
        return (centred / (r.std(1, keepdim=True) + eps)).view(-1)
    if scale == "batch":
        return (centred / ((rewards.std() if batch_std is None else batch_std) + eps)).view(-1)
    if scale == "none":
        return centred.view(-1)
    raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate over answer tokens; with approx-KL (k3 of the new vs old policy) and the share
    of tokens where the clip was active, for the logs."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
    clipped = masked_mean(((ratio - 1).abs() > clip).to(logp.dtype), mask)
    return masked_mean(loss, mask), {"approx_kl": approx_kl.detach(), "clip_fraction": clipped.detach(),
                                     "ratio": masked_mean(ratio, mask).detach()}


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old ± clip) - R)^2) over answer tokens."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
