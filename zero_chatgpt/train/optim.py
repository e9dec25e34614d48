"""The loop's optimizers: AdamW alone, or Muon for the blocks' matrices beside AdamW for the rest (one object
with one state dict), and the exponential moving average of the weights (ema_decay)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.train_settings import TrainingSection


def build_optimizer(model: torch.nn.Module, s: TrainingSection, device: torch.device):
    """AdamW with weight decay on matrices (linear + embedding weights) only; norms' gains
    are not decayed (as GPT-2/LLaMA practice). β = (0.9, 0.95) — the seed ran with β1 = 0.95
    by passing betas twice.

    optimizer = "muon": Muon (Jordan et al. 2024; torch.optim.Muon) for the transformer blocks' weight
    matrices, AdamW as above for the rest (embedding, head, norms), as nanochat and modded-nanogpt do:
    Muon orthogonalizes each matrix's momentum update (Newton-Schulz), which trains hidden matrices in
    fewer steps; embeddings and gains are not matrices in that sense. Muon's lr is scaled to match
    AdamW's update size (adjust_lr_fn="match_rms_adamw", Moonlight, arXiv:2502.16982), so one lr and
    one schedule serve both."""
    decay, no_decay, hidden = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if s.optimizer == "muon" and p.dim() == 2 and ".layers." in f".{name}":
            hidden.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu") and not s.fsdp
    adamw = torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8, fused=fused)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(hidden, lr=s.lr, weight_decay=s.weight_decay, adjust_lr_fn="match_rms_adamw")
    return OptimizerPair([muon, adamw])


class OptimizerPair:
    """Several optimizers over disjoint parameters, stepped as one (the loop sets lr on param_groups)."""

    def __init__(self, optimizers: list):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(saved, list) or len(saved) != len(self.optimizers):
            raise UserError("the checkpoint's optimizer state is not this optimizer's (was the run trained with "
                            "another `optimizer`?); undo the change, or rerun with --force")
        for o, st in zip(self.optimizers, saved):
            o.load_state_dict(st)


class WeightEMA:
    """An exponential moving average of a model's parameters (Polyak averaging; the "EMA of the actor"
    of InstructGPT-style RLHF, e.g. DeepSpeed-Chat's --enable_ema): the average, not the last noisy
    step, is what is evaluated and shipped. Kept in fp32 beside the weights, on their device."""

    FOLDER = "ema"     # its subfolder in a step-N checkpoint (restored on resume, so resume stays exact)

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        torch._foreach_lerp_(self.params, [p.detach().float() for p in model.parameters()], 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module):
        """The model holds the average inside the block and its own weights again after it."""
        live = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            for p, e in zip(model.parameters(), self.params):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(model.parameters(), live):
                    p.copy_(w)

    def state_dict(self, model: torch.nn.Module) -> dict:
        with self.swapped_in(model):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def load(self, model: torch.nn.Module, folder: Path) -> None:
        with self.swapped_in(model):
            ckpt.load_weights(model, folder)
            self.params = [p.detach().float().clone() for p in model.parameters()]
