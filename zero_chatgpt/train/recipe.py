"""The skeleton every trained stage shares (pretrain, sft, rm, ppo, dpo, grpo), written once.

A trained stage reads, top to bottom:

    s = recipe.start(ctx, "dpo", extra=...)     # distributed setup, begin (None: up to date), tokenizer
    if s is None:
        return
    s.on_main_then_wait(build_data)             # rank 0 writes the stage's data in the run directory
    ...                                         # the stage's own data, model(s), batches, loss, eval
    result = s.train(s.settings(grad_accum=..., seed=...), model=..., batches=..., loss_fn=..., eval_fn=...)
    if s.main:
        ...                                     # the stage's summary, then s.run.complete(...)

so a stage supplies only what is its own; the order of the shared steps, the stage's folder, its logs, its
key in the checkpoints and its schedule (a continued run keeps its first run's) are decided here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from zero_chatgpt.core.registry import STAGES
from zero_chatgpt.core.rundir import Context, StageRun, begin
from zero_chatgpt.core.runtime import Dist, setup_distributed
from zero_chatgpt.core.settings import Config
from zero_chatgpt.core.train_settings import TrainingSection
from zero_chatgpt.model.tokenizer import load_tokenizer
from zero_chatgpt.train import loop
from zero_chatgpt.train.train_log import TrainResult

T = TypeVar("T")


@dataclass
class StageStart:
    """A trained stage that has work to do: its context, processes, run record and tokenizer."""
    ctx: Context
    name: str
    d: Dist
    run: StageRun
    tok: object

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def rd(self):
        return self.ctx.run_dir

    @property
    def c(self) -> TrainingSection:
        """The stage's config section."""
        return self.ctx.cfg.section(self.name)

    @property
    def main(self) -> bool:
        return self.d.main

    @property
    def out(self) -> Path:
        return self.rd / STAGES[self.name].out

    def on_main_then_wait(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only (it writes into the run directory); the other ranks wait for it."""
        result = fn() if self.d.main else None
        if self.d.world > 1:
            torch.distributed.barrier()
        return result

    def settings(self, *, grad_accum: int = 1, seed: int, **overrides) -> loop.LoopSettings:
        """The loop settings from the stage's section, with the schedule of the run this one continues."""
        return loop.LoopSettings.from_section(self.c, grad_accum=grad_accum, seed=seed,
                                              schedule_steps=self.run.schedule_steps, **overrides)

    def train(self, settings: loop.LoopSettings, *, meta: dict | None = None, **kw) -> TrainResult:
        """The one training loop, into the stage's folder, with the stage's key in every checkpoint."""
        return loop.train(settings, stage=self.name, stage_dir=self.out, log_dir=self.rd.logs, dist_info=self.d,
                          meta={"stage_key": self.run.key, **(meta or {})}, **kw)


def start(ctx: Context, name: str, *, extra: dict | None = None, reads: tuple[str, ...] | None = None
          ) -> StageStart | None:
    """The opening of every trained stage: the distributed setup, `begin` (None when the stage is up to
    date, or refused with a UserError), and the run's tokenizer."""
    d = setup_distributed(ctx.cfg.run.device)
    run = begin(ctx, name, extra=extra, reads=reads)
    if run.skip:
        return None
    return StageStart(ctx, name, d, run, load_tokenizer(ctx.run_dir.tokenizer))
