"""`zero-chatgpt grpo`: group relative policy optimization (Shao et al. 2024, DeepSeekMath,
arXiv:2402.03300) through the one loop: no critic.

Each rollout (train/onpolicy.py) samples grpo.samples_per_prompt answers to each of
grpo.prompts_per_rollout RL prompts; every answer's reward is

    grpo.reward = "rm"        the normalized reward-model score
                  "rules"     exactly checkable rewards where a prompt kind has one: 1 when a pinyin
                              answer equals the dictionary's (tone marks normalized), 1 when a chaining
                              answer is a dictionary idiom starting with the right character, else 0
                              (RL with verifiable rewards; only those kinds are sampled)
                  "reference" char_f1 of the answer against the RL idiom's dictionary answer, on the kinds
                              with one right answer (meaning, origin, example, pinyin): a reference-overlap
                              reward, as ROUGE-L was for summarization RL (Paulus et al. 2018,
                              arXiv:1705.04304); the reported char_f1 is on other idioms (eval's test part)
                  "a+b"       the sum ("rm+rules", "rm+reference", ...); rules and reference weighted by
                              grpo.rules_weight
    minus grpo.missing_eos_penalty for an answer that never ended and grpo.loop_penalty for one that loops;

the advantage of each answer is its reward minus its prompt's group mean, divided by the group's std,
the rollout's std or nothing (grpo.scale_rewards, rl_math.group_advantages), on every token of it. The loss
is the clipped ratio loss plus grpo.kl_coef x the k3 estimate of KL(pi || pi_ref) per token (the paper's unbiased, always positive form). A rollout whose KL to SFT
exceeds grpo.kl_budget ends the run; final/ is the step with the best held-out gold char_f1. With
grpo.ptx_coef > 0 every step also trains on a few SFT conversations (InstructGPT's PPO-ptx mix), which
holds the skills the reward does not look at (pinyin, chaining) where RL alone wears them down.
"""
from __future__ import annotations

import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.train_settings import GRPOSection
from zero_chatgpt.data.builtin import load_idioms
from zero_chatgpt.data.chat_data import SCORED_KINDS
from zero_chatgpt.eval.metrics import chain_valid, char_f1
from zero_chatgpt.eval.pinyin import pinyin_exact
from zero_chatgpt.model.losses import IGNORE, TokenLogProbs
from zero_chatgpt.model.reward_model import RewardScorer, load_scorer
from zero_chatgpt.train import alignment
from zero_chatgpt.train.onpolicy import RolloutBatches, policy_setup, rollout_settings, sequence_rewards
from zero_chatgpt.train.rl_math import clipped_policy_loss, group_advantages, masked_mean

RULE_KINDS = ("pinyin", "chain")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per token exp(r) - r - 1 with r = log pi_ref - log pi: unbiased for KL(pi || pi_ref), >= 0 (Schulman 2020)."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def rule_rewards(records: list[dict], tok, idioms: set[str] | None, rules: bool = True, reference: bool = False):
    """rule_fn(prompt indices, answers) -> rewards: with `rules`, pinyin_exact / chain_valid where defined;
    with `reference`, plus char_f1 against the record's reference on the kinds with one right answer."""

    def fn(idx: list[int], answers: list[list[int]]) -> list[float]:
        out = []
        for i, a in zip(idx, answers):
            rec = records[i]
            meta = rec.get("meta", {})
            kind = meta.get("kind")
            text = tok.decode([t for t in a if t not in tok.stop_ids])
            r = 0.0
            if rules and kind == "pinyin":
                r += float(pinyin_exact(text, rec.get("reference", "")))
            elif rules and kind == "chain" and idioms is not None:
                r += float(chain_valid(text, meta["first_char"], idioms, meta.get("idiom", "")))
            if reference and kind in SCORED_KINDS and rec.get("reference"):
                r += char_f1(text, rec["reference"])
            out.append(r)
        return out
    return fn


def grpo_loss(temperature: float, clip: float, kl_coef: float, ptx_coef: float = 0.0):
    """The loop's loss over a rollout minibatch: the clipped policy loss + kl_coef x the k3 KL to the reference
    (+ ptx_coef x the SFT loss of the batch's `ptx` part, as PPO's)."""
    def loss_fn(model, b):
        mask = (b["labels"] != IGNORE).float()
        logp = model(b["ids"], output=TokenLogProbs(b["labels"], temperature))
        pg, m = clipped_policy_loss(logp, b["old_logp"], b["advantages"], mask, clip)
        kl = masked_mean(k3_kl(logp, b["ref_logp"]), mask)
        metrics = {**b["stats"], **m, "policy_loss": pg.detach(), "kl_k3": kl.detach()}
        return alignment.add_sft_mix(pg + kl_coef * kl, metrics, model, b, ptx_coef), metrics, int(mask.sum())
    return loss_fn


def _all_ranks_std(x: torch.Tensor, src) -> torch.Tensor:
    """The std (n - 1 in the denominator, as torch.std) of x over every rank's rows (each rank holds as many),
    so that a rollout split over processes is scaled as it would be in one."""
    if src.world == 1:
        return x.std()
    m = src.all_ranks_mean({"mean": float(x.double().mean()), "sq": float((x.double() ** 2).mean())})
    n = x.numel() * src.world
    return torch.tensor(max(m["sq"] - m["mean"] ** 2, 0.0) * n / max(n - 1, 1), dtype=x.dtype).sqrt()


class GRPOScoring:
    def __init__(self, scorer: RewardScorer | None, rule_fn, k: int, c: GRPOSection, tok):
        self.scorer, self.rule_fn, self.k, self.c, self.tok = scorer, rule_fn, k, c, tok

    def score(self, buf: dict, prompts, answers, idx, src) -> dict:
        mask = (buf["labels"] != IGNORE).float()
        seq, stats = sequence_rewards(self.scorer, self.rule_fn, prompts, answers, idx, self.tok,
                                      self.c.missing_eos_penalty, self.c.loop_penalty)
        scale = self.c.scale_rewards
        adv = group_advantages(seq, self.k, scale=scale, batch_std=_all_ranks_std(seq, src) if scale == "batch" else None)
        buf["advantages"] = adv[:, None] * mask
        flat = (seq.view(-1, self.k).std(1) < 1e-6).float().mean()
        return {**stats, "flat_groups": float(flat)}     # groups whose answers all scored alike teach nothing

    def update(self, stats: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass


def run_stage(ctx) -> None:
    cfg, rd, c = ctx.cfg, ctx.run_dir, ctx.cfg.grpo
    p = policy_setup(ctx, "grpo")
    if p is None:
        return
    d, run, tok, sft_path, records, pool, settings = p.d, p.run, p.tok, p.sft_path, p.records, p.pool, p.settings
    reward = c.reward
    parts = reward.split("+")
    if "rm" not in parts:          # without the reward model: only the kinds some reward is defined on
        kinds = set(RULE_KINDS if "rules" in parts else ()) | set(SCORED_KINDS if "reference" in parts else ())
        keep = [i for i, r in enumerate(records) if r.get("meta", {}).get("kind") in kinds]
        if not keep:
            raise UserError(f"grpo.reward = \"{reward}\": no {' or '.join(sorted(kinds))} prompts in "
                            f"{rd.sft_data / 'rl.jsonl'}; use grpo.reward = \"rm\"")
        records, pool = [records[i] for i in keep], [pool[i] for i in keep]
    scorer = rule_fn = None
    if "rm" in parts:
        scorer = load_scorer(rd, tok, cfg, d.device)
    if "rules" in parts or "reference" in parts:
        idioms = None
        if all(r.get("meta", {}).get("source") == "builtin" for r in records):
            idioms = {x["word"] for x in load_idioms()}
        base = rule_rewards(records, tok, idioms, rules="rules" in parts, reference="reference" in parts)
        w = c.rules_weight
        rule_fn = (lambda idx, answers: [w * x for x in base(idx, answers)])
    k = c.samples_per_prompt
    rs = rollout_settings(cfg, c, samples_per_prompt=k)
    actor = ckpt.load_model(sft_path).train()
    ref = ckpt.load_model(sft_path, device=d.device)
    batches = RolloutBatches(rs, pool=pool, policy=actor, ref=ref, tok=tok, scoring=GRPOScoring(scorer, rule_fn, k, c, tok),
                             precision=p.precision, rank=d.rank, world=d.world)
    batches = alignment.with_sft_mix(ctx, batches, tok, c, rs.seed)
    loss_fn = grpo_loss(rs.temperature, c.clip, c.kl_coef, c.ptx_coef)

    gold = alignment.gold_records(cfg, rd)
    info(f"grpo: {len(pool):,} RL prompts, {rs.prompts} per rollout x {k} samples, reward {reward}, {rs.epochs} "
         f"epochs x {rs.minibatches} minibatches per rollout, {settings.max_steps} steps; best of {len(gold)} gold "
         f"prompts' char_f1 every {settings.eval_every} steps becomes final")
    gold_fn = alignment.gold_eval(tok, gold, cfg.rl.gold_max_new_tokens, start=sft_path,
                                  seed=cfg.run.seed)
    result = p.start.train(settings, model=actor, batches=batches, loss_fn=loss_fn, eval_fn=gold_fn,
                           meta={"init_from": str(sft_path)})
    if not d.main:
        return
    steps = [{k_: h.get(k_) for k_ in ("step", "rollout", "reward", "rm_score", "rule_reward", "kl", "entropy",
                                       "answer_tokens", "eos_rate", "flat_groups", "loop_rate")} for h in batches.history]
    alignment.write_curves(rd, "grpo", result, steps, {"reward": reward})
    alignment.finish(run, rd, "grpo", result, [
        ["rollouts", len(batches.history)], ["reward", reward],
        ["reward (first → last rollout)", alignment.first_last(batches.history, "reward")],
        ["KL to SFT, nats per answer (first → last)", alignment.first_last(batches.history, "kl")]])
