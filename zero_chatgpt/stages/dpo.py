"""`zero-chatgpt dpo`: direct preference optimization (Rafailov et al. 2023, arXiv:2305.18290) through
the one training loop.

    loss = -log σ(β [(log π − log π_ref)(y⁺) − (log π − log π_ref)(y⁻)])  (+ dpo.sft_loss × NLL(y⁺))

on the reward model's training pairs (RUN_DIR/rm_data/train.jsonl: chosen = the reference, rejected =
an SFT sample or a rule-made negative). π starts from the SFT model, π_ref is the SFT model, frozen;
each pair's reference log-probabilities are computed once, the first time the pair is drawn, and kept.
Chosen and rejected go through one forward (train/pairs.py). Every dpo.eval_every steps the model
answers rl.gold_prompts held-out prompts (the eval split's gold part, never reported) greedily; the
step with the best char_f1 becomes dpo/final (the loop's select_metric), so a run that starts to hurt
keeps its best point.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info
from zero_chatgpt.data import preference as pref
from zero_chatgpt.model.losses import IGNORE
from zero_chatgpt.train import alignment, loop, recipe
from zero_chatgpt.train.pairs import PairBatches, collate, encode_pairs, sequence_logprobs


def dpo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """The sigmoid DPO loss of (2B,) policy and reference sequence log-probs (chosen rows first)."""
    half = logp.shape[0] // 2
    chosen = beta * (logp[:half] - ref_logp[:half])            # the implicit rewards
    rejected = beta * (logp[half:] - ref_logp[half:])
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"reward_accuracy": (chosen > rejected).float().mean(), "reward_margin": (chosen - rejected).mean(),
                  "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean()}


class DPOBatches(PairBatches):
    """Pair batches with each pair's reference log-probs (computed with the frozen SFT model once)."""

    def __init__(self, *args, ref_model, **kw):
        super().__init__(*args, **kw)
        self.ref = ref_model.eval()
        self.cache: dict[int, tuple[float, float]] = {}

    @torch.no_grad()
    def _ref_logps(self, idx: list[int]) -> torch.Tensor:
        todo = [i for i in idx if i not in self.cache]
        if todo:
            device = next(self.ref.parameters()).device
            b = {k: v.to(device) for k, v in collate(self.data, todo, self.pad_id).items()}
            lp = sequence_logprobs(self.ref, b).tolist()
            for k, i in enumerate(todo):
                self.cache[i] = (lp[k], lp[len(todo) + k])
        return torch.tensor([self.cache[i][0] for i in idx] + [self.cache[i][1] for i in idx], dtype=torch.float32)

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        m = (step * self.accum + micro) * world + rank
        idx = self.pairs_of(m)
        return {**collate(self.data, idx, self.pad_id), "ref_logp": self._ref_logps(idx)}


def run_stage(ctx) -> None:
    # its gold prompts are eval's gold part: the share that is gold decides them (and keeps them out of the report)
    s = recipe.start(ctx, "dpo", extra={"eval.gold_fraction": ctx.cfg.eval.gold_fraction})
    if s is None:
        return
    cfg, rd, c, d, tok = s.cfg, s.rd, s.c, s.d, s.tok
    sft_path = Path(c.init_from) if c.init_from else ckpt.stage_model_path(rd, "sft")
    pairs = pref.read_pairs(rd / "rm_data" / "train.jsonl")
    max_len = min(c.max_seq_len, ckpt.read_model_config(sft_path).max_position_embeddings)
    enc = encode_pairs(tok, pairs, max_len, desc="encode dpo pairs")
    micro = c.micro_batch_pairs
    accum = loop.grad_accum(c.batch_pairs, micro, d.world)
    seed = cfg.rl_seed()
    settings = s.settings(grad_accum=accum, seed=seed, init_from="", select_metric="gold_char_f1",
                          select_gate="gold_gain_lo", eval_at_start=True, select_from_start=True)
    batches = DPOBatches(enc, tok.pad_id, micro, accum, seed, ref_model=ckpt.load_model(sft_path, device=d.device))
    gold = alignment.gold_records(cfg, rd)
    beta, sft_w = c.beta, c.sft_loss

    def loss_fn(model, batch):
        logp = sequence_logprobs(model, batch)
        loss, metrics = dpo_loss(logp, batch["ref_logp"], beta)
        if sft_w:
            half = logp.shape[0] // 2
            n_tok = (batch["labels"][:half] != IGNORE).sum(-1).clamp(min=1)
            nll = (-logp[:half] / n_tok).mean()
            loss = loss + sft_w * nll
            metrics["chosen_nll"] = nll.detach()
        return loss, metrics, logp.shape[0] // 2

    info(f"dpo: {len(enc):,} pairs, beta {beta}, {settings.max_steps} steps x {micro * accum * d.world} pairs "
         f"({settings.max_steps * micro * accum * d.world / len(enc):.2f} epochs); best of {len(gold)} gold prompts' "
         f"char_f1 every {settings.eval_every} steps becomes final")
    model = ckpt.load_model(sft_path).train()
    gold_fn = alignment.gold_eval(tok, gold, cfg.rl.gold_max_new_tokens, start=sft_path,
                                  seed=cfg.run.seed)
    result = s.train(settings, model=model, batches=batches, loss_fn=loss_fn, eval_fn=gold_fn,
                     meta={"init_from": str(sft_path)})
    if not s.main:
        return
    alignment.write_curves(rd, "dpo", result, alignment.train_curve(rd, "dpo", ("reward_margin", "reward_accuracy")),
                           {"pairs": len(enc)})
    alignment.finish(s.run, rd, "dpo", result, [["pairs", len(enc)], ["beta", beta]])
