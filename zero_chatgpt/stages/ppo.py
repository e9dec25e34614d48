"""`zero-chatgpt ppo`: proximal policy optimization against the reward model (Schulman et al. 2017,
arXiv:1707.06347; the RLHF recipe of Ziegler et al. 2019 and InstructGPT), through the one loop.

Models: the actor starts from SFT; the reference is SFT, frozen; the critic starts from the reward
model (its head's gain scaled by the RM's normalization, so values start in reward units); the RM,
frozen, with its normalization. Each rollout (train/onpolicy.py) samples ppo.prompts_per_rollout
answers of RL prompts (idioms the RM never saw) at rl.temperature, up to rl.max_new_tokens (the
length the RM was trained on), then:

    reward_t = -beta * (log pi - log pi_ref)_t            every answer token (k1 KL penalty)
             + RM(prompt, answer) - missing_eos_penalty   at the answer's last token (normalized score),
             - loop_penalty                               the latter when the answer never ended, the other
                                                          when it loops (eval's repetition_rate)

beta follows the adaptive controller toward ppo.kl_target (rl_math.AdaptiveKL); advantages by GAE
(gamma, lambda) whitened over the rollout's answer tokens; returns for the critic. Then
ppo.epochs x ppo.minibatches optimizer steps of the clipped policy loss plus ppo.vf_coef x the
clipped value loss (one backward, an optimizer per model), optionally + ppo.ptx_coef x the SFT
loss on SFT conversations. A rollout whose KL to SFT exceeds ppo.kl_budget ends the run, and
final/ is the step with the best held-out gold char_f1 (train/alignment.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info
from zero_chatgpt.core.train_settings import PPOSection
from zero_chatgpt.model.losses import IGNORE, ScalarValues, TokenLogProbs
from zero_chatgpt.model.reward_model import RewardScorer, load_scorer
from zero_chatgpt.train import alignment
from zero_chatgpt.train.onpolicy import (
    RolloutBatches,
    last_answer_index,
    policy_setup,
    rollout_settings,
    sequence_rewards,
)
from zero_chatgpt.train.rl_math import (
    AdaptiveKL,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    masked_mean,
    masked_whiten,
)


class PPOScoring:
    """PPO's part of a rollout: values, per-token rewards with the KL penalty, GAE, whitened advantages."""

    def __init__(self, critic, scorer: RewardScorer, kl: AdaptiveKL, c: PPOSection, tok, prompts_per_rollout: int):
        self.critic, self.scorer, self.kl, self.c, self.tok = critic, scorer, kl, c, tok
        self.prompts_per_rollout = prompts_per_rollout

    def score(self, buf: dict, prompts, answers, idx, src) -> dict:
        mask = (buf["labels"] != IGNORE).float()
        values = src.forward_rows(self.critic, lambda lab: ScalarValues()) * mask
        seq, stats = sequence_rewards(self.scorer, None, prompts, answers, idx, self.tok,
                                      self.c.missing_eos_penalty, self.c.loop_penalty)
        beta = self.kl.beta
        rewards = -beta * (buf["old_logp"] - buf["ref_logp"]) * mask
        last = last_answer_index(buf["labels"])
        rewards[torch.arange(len(answers)), last] += seq
        adv, returns = gae(rewards, values, mask, self.c.gamma, self.c.lam)
        buf.update(old_values=values, returns=returns, advantages=masked_whiten(adv, mask))
        return {**stats, "kl_coef": beta, "value": float(masked_mean(values, mask)),
                "return": float(masked_mean(returns, mask))}

    def update(self, stats: dict) -> None:
        """After every rank's figures are in: move beta toward the target KL (Ziegler et al.: n = batch size)."""
        self.kl.update(stats["kl"], self.prompts_per_rollout)

    def state_dict(self) -> dict:
        return self.kl.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.kl.load_state_dict(d)


def ppo_loss(temperature: float, clip: float, value_clip: float, vf_coef: float, ptx_coef: float = 0.0):
    """The loop's loss over {"model": actor, "critic": critic} and a rollout minibatch: the clipped policy
    loss + vf_coef x the clipped value loss (+ ptx_coef x the SFT loss of the batch's `ptx` part)."""
    def loss_fn(models, b):
        mask = (b["labels"] != IGNORE).float()
        logp = models["model"](b["ids"], output=TokenLogProbs(b["labels"], temperature))
        pg, m = clipped_policy_loss(logp, b["old_logp"], b["advantages"], mask, clip)
        values = models["critic"](b["ids"], output=ScalarValues())
        vf = clipped_value_loss(values, b["old_values"], b["returns"], mask, value_clip)
        metrics = {**b["stats"], **m, "policy_loss": pg.detach(), "value_loss": vf.detach()}
        loss = alignment.add_sft_mix(pg + vf_coef * vf, metrics, models["model"], b, ptx_coef)
        return loss, metrics, int(mask.sum())
    return loss_fn


def critic_from(rm_path: Path, scorer: RewardScorer):
    """The reward model as the critic's start, its head scaled by the normalization's gain."""
    critic = ckpt.load_model(rm_path)
    with torch.no_grad():
        critic.score.weight.mul_(scorer.norm.gain)
    return critic.train()


def run_stage(ctx) -> None:
    cfg, rd, c = ctx.cfg, ctx.run_dir, ctx.cfg.ppo
    p = policy_setup(ctx, "ppo")
    if p is None:
        return
    d, run, tok, sft_path, pool, settings, precision = p.d, p.run, p.tok, p.sft_path, p.pool, p.settings, p.precision
    scorer = load_scorer(rd, tok, cfg, d.device)
    rs = rollout_settings(cfg, c)
    kl = AdaptiveKL(beta=c.kl_coef, target=c.kl_target or None, horizon=c.kl_horizon)
    critic = critic_from(rd / "rm" / "final", scorer)
    actor = ckpt.load_model(sft_path).train()
    ref = ckpt.load_model(sft_path, device=d.device)
    scoring = PPOScoring(critic, scorer, kl, c, tok, rs.prompts)
    batches = RolloutBatches(rs, pool=pool, policy=actor, ref=ref, tok=tok, scoring=scoring, precision=precision,
                             rank=d.rank, world=d.world)
    batches = alignment.with_sft_mix(ctx, batches, tok, c, rs.seed)
    loss_fn = ppo_loss(rs.temperature, c.clip, c.value_clip, c.vf_coef,
                       c.ptx_coef)

    gold = alignment.gold_records(cfg, rd)
    info(f"ppo: {len(pool):,} RL prompts, {rs.prompts} per rollout, {rs.epochs} epochs x {rs.minibatches} "
         f"minibatches per rollout, {settings.max_steps} steps (~{-(-settings.max_steps // rs.updates)} rollouts); "
         f"KL target {c.kl_target:g}, budget {c.kl_budget:g} nats per answer; best of {len(gold)} gold "
         f"prompts' char_f1 every {settings.eval_every} steps becomes final")
    gold_fn = alignment.gold_eval(tok, gold, cfg.rl.gold_max_new_tokens, start=sft_path,
                                  seed=cfg.run.seed)
    result = p.start.train(settings, model=actor, batches=batches, loss_fn=loss_fn, eval_fn=gold_fn,
                           meta={"init_from": str(sft_path)},
                           extra_models={"critic": (critic, {"lr": c.critic_lr})})
    if not d.main:
        return
    steps = [{k: h.get(k) for k in ("step", "rollout", "reward", "rm_score", "kl", "kl_coef", "entropy",
                                    "answer_tokens", "eos_rate", "loop_rate")} for h in batches.history]
    alignment.write_curves(rd, "ppo", result, steps)
    last = batches.history[-1] if batches.history else {}
    alignment.finish(run, rd, "ppo", result, [
        ["rollouts", len(batches.history)],
        ["reward (first → last rollout)", alignment.first_last(batches.history, "reward")],
        ["KL to SFT, nats per answer (first → last)", alignment.first_last(batches.history, "kl")],
        ["KL coefficient now", last.get("kl_coef", float("nan"))]])

