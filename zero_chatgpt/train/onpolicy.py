"""On-policy RL through the one loop: the rollout batch source that PPO and GRPO share.

The loop asks for the batch of each optimizer step. A rollout serves `epochs x minibatches`
consecutive steps (PPO's schedule): at the first of them this source samples answers from the
current policy (the very module the loop trains, so the weights are the latest), has the stage
score them (`Scoring.score`: rewards, advantages, returns), keeps the buffer, and every step
hands out one minibatch of it; epoch 0 takes the rows in order, later epochs in a seeded shuffle.

What makes the first update's ratio exactly 1 (tests/train/test_ppo_grpo.py): the log-probabilities
the ratio divides by are not the generator's but a forward of the training code path
(`TokenLogProbs` at the sampling temperature, under the loop's precision) over the same
minibatch tensors epoch 0 trains on: the same rows, right-padded to the rollout's one width.
Sampling has no top-k / top-p / repetition filter (rollout.py); the model has no dropout.

Resume: the buffer, the rollout index, the stage's own state (PPO's KL controller) and the
per-rollout history are this source's `state_dict`, saved by the loop with every checkpoint, so
a run killed mid-rollout resumes on the same buffer; a new rollout samples with a generator
seeded by (seed, rollout, rank), so it draws what an uninterrupted run would have drawn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.settings import Config
from zero_chatgpt.core.train_settings import PolicySection
from zero_chatgpt.eval.metrics import is_repetitive
from zero_chatgpt.eval.prompts import encode_prompts
from zero_chatgpt.model.generate import answer_ended
from zero_chatgpt.model.losses import IGNORE, TokenLogProbs, answer_rows
from zero_chatgpt.model.reward_model import RewardScorer
from zero_chatgpt.train import alignment, loop, recipe
from zero_chatgpt.train.rl_math import masked_mean
from zero_chatgpt.train.rollout import prompt_limit, sample


@dataclass
class RolloutSettings:
    prompts: int                 # prompts per rollout, all ranks together
    samples_per_prompt: int      # GRPO's k (PPO: 1); a prompt's samples are consecutive rows
    epochs: int                  # passes over each rollout
    minibatches: int             # optimizer steps per pass
    temperature: float
    max_new_tokens: int
    seed: int
    gen_batch_size: int = 64
    kl_budget: float = 0.0       # stop when a rollout's mean KL to the reference (nats per answer) exceeds it; 0 = none

    @property
    def updates(self) -> int:
        return self.epochs * self.minibatches


class Scoring(Protocol):
    """The stage's part of a rollout: fill `buf` with what its loss needs and return the rollout's figures."""

    def score(self, buf: dict, prompts: list[list[int]], answers: list[list[int]], prompt_index: list[int],
              src: "RolloutBatches") -> dict: ...

    def update(self, stats: dict) -> None: ...       # after every rank's figures are averaged

    def state_dict(self) -> dict: ...

    def load_state_dict(self, d: dict) -> None: ...


def last_answer_index(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the position of each row's last answer label (where a sequence-level reward is given)."""
    T = labels.shape[1]
    pos = torch.arange(T).expand_as(labels)
    return torch.where(labels != IGNORE, pos, torch.full_like(pos, -1)).max(1).values


class RolloutBatches:
    """The loop's batch source for PPO and GRPO (see the module docstring)."""

    def __init__(self, settings: RolloutSettings, *, pool: list[list[int]], policy, ref, tok, scoring: Scoring,
                 precision: str, rank: int = 0, world: int = 1):
        if not pool:
            raise UserError("no RL prompts to sample from; check RUN_DIR/sft_data/rl.jsonl")
        if settings.prompts % world:
            raise UserError(f"{settings.prompts} prompts per rollout do not split over {world} processes; "
                            f"make the rollout's prompts a multiple of the process count")
        self.s, self.pool, self.policy, self.ref, self.tok = settings, pool, policy, ref.eval(), tok
        self.scoring, self.rank, self.world = scoring, rank, world
        self.precision = precision
        self.index = -1                      # the rollout in `buf`
        self.buf: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.history: list[dict] = []        # one record per rollout: its first step and its figures
        self.stopped: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device     # where the loop put it

    # ---------------------------------------------------------------- which prompts

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.s.seed, 17, epoch]).permutation(len(self.pool))

    def prompt_indices(self, r: int) -> list[int]:
        """This rank's prompts of rollout r: its share of the r-th block of seeded passes over the pool."""
        n, P, out = len(self.pool), self.s.prompts, []
        perms: dict[int, np.ndarray] = {}
        for k in range(r * P + self.rank, (r + 1) * P, self.world):
            epoch, i = divmod(k, n)
            if epoch not in perms:
                perms[epoch] = self._perm(epoch)
            out.append(int(perms[epoch][i]))
        return out

    # ---------------------------------------------------------------- one rollout

    def minibatch_rows(self, r: int, epoch: int) -> list[torch.Tensor]:
        N = next(iter(self.buf.values())).shape[0]
        order = torch.arange(N) if epoch == 0 else torch.from_numpy(
            np.random.default_rng([self.s.seed, 29, r, epoch]).permutation(N))
        size = -(-N // self.s.minibatches)
        return [order[i:i + size] for i in range(0, N, size)]

    @torch.no_grad()
    def forward_rows(self, model, output_fn) -> torch.Tensor | tuple:
        """`model(ids, output=output_fn(labels))` over epoch 0's minibatches, as the loss will see them."""
        outs = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            for rows in self.minibatch_rows(self.index, 0):
                ids, labels = self.buf["ids"][rows].to(self.device), self.buf["labels"][rows].to(self.device)
                outs.append(model(ids, output=output_fn(labels)))
        if isinstance(outs[0], tuple):
            return tuple(torch.cat([o[k] for o in outs]).float().cpu() for k in range(len(outs[0])))
        return torch.cat(outs).float().cpu()

    def _rollout(self, r: int) -> None:
        s, tok = self.s, self.tok
        idx = [i for i in self.prompt_indices(r) for _ in range(s.samples_per_prompt)]
        limit = prompt_limit(self.policy, s.max_new_tokens)          # as sample() cuts them
        prompts = [self.pool[i][-limit:] for i in idx]
        was_training = self.policy.training
        self.policy.eval()
        gens = sample(self.policy, tok, prompts, temperature=s.temperature, max_new_tokens=s.max_new_tokens,
                      seed=(s.seed * 1000003 + r) * 64 + self.rank, batch_size=s.gen_batch_size, show_progress=False)
        answers = [g.tokens if g.tokens else [tok.im_end_id] for g in gens]
        ids, labels = answer_rows(prompts, answers, tok.pad_id)
        self.index, self.buf = r, {"ids": ids, "labels": labels}
        T = s.temperature
        logp, ent = self.forward_rows(self.policy, lambda lab: TokenLogProbs(lab, T, entropy=True))
        self.buf["old_logp"] = logp
        self.buf["ref_logp"] = self.forward_rows(self.ref, lambda lab: TokenLogProbs(lab, T))
        mask = (labels != IGNORE).float()
        ended = ended_mask(answers, tok)
        kl = ((logp - self.buf["ref_logp"]) * mask).sum(1)
        local = {"kl": float(kl.mean()), "kl_per_token": float(masked_mean(logp - self.buf["ref_logp"], mask)),
                 "entropy": float(masked_mean(ent, mask)), "answer_tokens": float(mask.sum(1).mean()),
                 "eos_rate": float(ended.mean())}
        local.update(self.scoring.score(self.buf, prompts, answers, idx, self))
        self.stats = self.all_ranks_mean(local)
        self.scoring.update(self.stats)
        if was_training:
            self.policy.train()

    def all_ranks_mean(self, stats: dict[str, float]) -> dict[str, float]:
        """The mean of each figure over ranks (every rank holds as many rows), so all ranks log and decide alike."""
        if self.world == 1:
            return stats
        keys = sorted(stats)
        t = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    # ---------------------------------------------------------------- the loop's seams

    def stop_before(self, step: int) -> str | None:
        """Sample the rollout a step starts, if it starts one; the KL budget's verdict on it."""
        r = step // self.s.updates
        if r != self.index:
            self._rollout(r)
            self.history.append({"step": step, "rollout": r, **self.stats})
            budget = self.s.kl_budget
            self.stopped = (f"rollout {r}'s KL to the reference {self.stats['kl']:.3f} nats per answer is over the "
                            f"KL budget {budget:g}") if budget and self.stats["kl"] > budget else None
        return self.stopped

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        r, j = divmod(step, self.s.updates)
        if r != self.index:
            self.stop_before(step)
        epoch, k = divmod(j, self.s.minibatches)
        rows = self.minibatch_rows(r, epoch)[k]
        return {**{name: t[rows] for name, t in self.buf.items()}, "stats": dict(self.stats)}

    def state_dict(self) -> dict:
        return {"index": self.index, "buf": self.buf, "stats": self.stats, "history": self.history,
                "stopped": self.stopped, "scoring": self.scoring.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.index, self.buf, self.stats = int(d["index"]), dict(d["buf"]), dict(d["stats"])
        self.history, self.stopped = list(d["history"]), d.get("stopped")
        self.scoring.load_state_dict(d["scoring"])


def ended_mask(answers: list[list[int]], tok) -> torch.Tensor:
    return torch.tensor([answer_ended(a, tok.stop_ids) for a in answers], dtype=torch.float32)


def sequence_rewards(scorer: RewardScorer | None, rule_fn, prompts, answers, idx, tok, missing_eos_penalty: float,
                     loop_penalty: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(N,) each answer's reward: the normalized RM score (if a scorer), + rule rewards (if rule_fn),
    - missing_eos_penalty for an answer that never ended, - loop_penalty for one that loops (a 4-gram three
    times or more: eval/metrics.py: is_repetitive, eval's repetition_rate); with the parts for the logs."""
    ended = ended_mask(answers, tok)
    total = torch.zeros(len(answers))
    stats = {}
    if scorer is not None:
        rm = torch.from_numpy(scorer.score(prompts, answers)).float()
        total += rm
        stats["rm_score"] = float(rm.mean())
    if rule_fn is not None:
        rules = torch.tensor(rule_fn(idx, answers), dtype=torch.float32)
        total += rules
        stats["rule_reward"] = float(rules.mean())
    total -= missing_eos_penalty * (1 - ended)
    if loop_penalty:
        loops = torch.tensor([float(is_repetitive(tok.decode([t for t in a if t not in tok.stop_ids])))
                              for a in answers])
        total -= loop_penalty * loops
        stats["loop_rate"] = float(loops.mean())
    stats["reward"] = float(total.mean())
    return total, stats


def rollout_settings(cfg: Config, c: PolicySection, samples_per_prompt: int = 1) -> RolloutSettings:
    return RolloutSettings(prompts=c.prompts_per_rollout, samples_per_prompt=samples_per_prompt,
                           epochs=c.epochs, minibatches=c.minibatches,
                           temperature=cfg.rl.temperature, max_new_tokens=cfg.rl.max_new_tokens,
                           seed=cfg.rl_seed(), gen_batch_size=c.gen_batch_size,
                           kl_budget=c.kl_budget)


@dataclass
class PolicyRun:
    """What PPO and GRPO start alike."""
    start: recipe.StageStart     # processes, run record, tokenizer; start.train runs the loop
    sft_path: Path
    records: list[dict]          # the RL prompts' records
    pool: list[list[int]]        # their prompt ids
    settings: loop.LoopSettings
    precision: str               # what the loop resolves settings.precision to (rollout log-probs use it)

    @property
    def d(self) -> loop.Dist:
        return self.start.d

    @property
    def run(self):
        return self.start.run

    @property
    def tok(self):
        return self.start.tok


def policy_setup(ctx, name: str) -> PolicyRun | None:
    """The trained stage's start (recipe.start), the SFT path, the RL prompts, the loop settings. None when
    the stage is current."""
    s = recipe.start(ctx, name, extra={"eval.gold_fraction": ctx.cfg.eval.gold_fraction})
    if s is None:
        return None
    cfg, rd, c, d, tok = s.cfg, s.rd, s.c, s.d, s.tok
    if c.fsdp:
        raise UserError(f"{name}.fsdp: RL samples from the model it trains, which needs its whole weights on every "
                        f"process; use DDP (fsdp = false)")
    sft_path = Path(c.init_from) if c.init_from else ckpt.stage_model_path(rd, "sft")
    records = alignment.rl_prompt_records(rd)
    pool, _ = encode_prompts(tok, records, chat=True, limit=10 ** 9)
    settings = s.settings(grad_accum=1, seed=cfg.rl_seed(), init_from="", select_metric="gold_char_f1",
                          select_gate="gold_gain_lo", eval_at_start=True, select_from_start=True)
    return PolicyRun(s, sft_path, records, pool, settings,
                     loop.resolve_precision(settings.precision, d.device))
