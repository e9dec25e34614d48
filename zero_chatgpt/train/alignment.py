"""What the alignment stages (dpo, ppo, grpo) share around the loop: their prompts, the held-out gold
evaluation that picks each one's final checkpoint, an optional SFT mix loss, and the curves and
summary they leave behind.

Checkpoint selection (rlhf.md; the seed kept its last PPO step, its worst): every `eval_every` steps
the model answers rl.gold_prompts prompts of the eval split's gold part greedily; the step with the
best `gold_char_f1` becomes final/ (the loop's select_metric), the SFT model itself (step 0) included: when
no trained step beats it, final/ is SFT, and the stage says so. The gold part's idioms are never in
SFT, RM or RL data, and `zero-chatgpt eval` never reports them, so the reported test prompts stay
untouched by the selection.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import table
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.train_settings import PolicySection
from zero_chatgpt.data.chat_data import read_split
from zero_chatgpt.eval.metrics import aggregate, paired_bootstrap, per_prompt_values
from zero_chatgpt.eval.prompts import answer_prompts, gold_prompts
from zero_chatgpt.model.generate import answer_ended
from zero_chatgpt.model.losses import lm_loss
from zero_chatgpt.train.sft_data import collate, encode_records
from zero_chatgpt.train.train_log import TrainResult, summary_rows

CURVES_FILE = "rl_curves.json"


def rl_prompt_records(rd) -> list[dict]:
    """The RL part of the prompt pool (idioms disjoint from the reward model's; all of a pool without parts)."""
    return [r for r in read_split(rd.sft_data, "rl") if r.get("meta", {}).get("rl_part", "rl") == "rl"]


def gold_records(cfg, rd) -> list[dict]:
    return gold_prompts(rd, cfg.rl.gold_prompts, cfg.run.seed, gold_fraction=cfg.eval.gold_fraction)


def gold_eval(tok, records: list[dict], max_new_tokens: int, batch_size: int = 64, start: Path | None = None,
              seed: int = 0):
    """An eval_fn: greedy char_f1 (and eos rate) on held-out gold prompts, for checkpoint selection.

    With `start` (the folder of the weights the stage started from, SFT), also `gold_gain_lo`: the lower end
    of the 95 % paired bootstrap interval of this model's per-prompt char_f1 minus the start's, on the same
    prompts. The loop keeps a trained step only when it is above 0 (LoopSettings.select_gate): the best of a
    few noisy gold scores is biased upward (the winner's curse), and a step 0.005 better on 200 prompts is
    often worse on the held-out ones. The start's scores are computed once, from its own folder, so a resumed
    run gets the same ones."""
    base: list = []
    kinds = [r.get("meta", {}).get("kind", "chat") for r in records]

    def char_f1s(model) -> tuple[list[float], dict]:
        gens, _ = answer_prompts(model, tok, records, chat=True, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 desc="gold")
        values = per_prompt_values(records, [g.text for g in gens],
                                   [answer_ended(g.tokens, tok.stop_ids) for g in gens], None)
        s = aggregate(kinds, values)
        return [v if v is not None else 0.0 for v in values["char_f1"]], s

    def run(model) -> dict:
        mine, s = char_f1s(model)
        out = {"gold_char_f1": s.get("char_f1", 0.0), "gold_eos_rate": s.get("eos_rate", 0.0)}
        if start is not None:
            if not base:
                device = next(model.parameters()).device
                base.extend(char_f1s(ckpt.load_model(start, device=device))[0])
            d = paired_bootstrap(mine, base, resamples=2000, seed=seed)
            out["gold_gain_lo"] = d["ci95"][0] if d and "ci95" in d else 0.0
        return out
    return run


class WithSFTMix:
    """A batch source that adds `ptx`, a batch of SFT conversations, to every batch of `inner` (the
    InstructGPT "PPO-ptx" mix that keeps RL from forgetting what SFT taught); rows seeded by the step."""

    def __init__(self, inner, data, pad_id: int, rows: int, seed: int):
        self.inner, self.data, self.pad_id, self.rows, self.seed = inner, data, pad_id, rows, seed

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        rng = np.random.default_rng([self.seed, 41, step, micro, rank])
        pick = rng.choice(len(self.data), size=min(self.rows, len(self.data)), replace=False)
        return {**self.inner(step, micro, rank, world), "ptx": collate(self.data, pick.tolist(), self.pad_id)}

    def __getattr__(self, name):          # stop_before, state_dict, load_state_dict, history of the inner source
        return getattr(self.inner, name)


def sft_mix_data(ctx, tok, limit: int):
    """Encoded SFT training conversations for WithSFTMix (the first `limit` of the train split)."""
    recs = read_split(ctx.run_dir.sft_data, "train")[:limit]
    return encode_records(tok, recs, ctx.cfg.sft.max_seq_len, desc="encode sft mix")


def sft_mix_loss(model, ptx: dict) -> torch.Tensor:
    loss, _ = lm_loss(model, ptx["input_ids"], ptx["labels"])
    return loss


def with_sft_mix(ctx, batches, tok, c: PolicySection, seed: int):
    """`batches`, with c.ptx_rows SFT conversations added to every batch when the stage's section `c` sets
    ptx_coef > 0 (PPO's and GRPO's); as it is otherwise."""
    if c.ptx_coef <= 0:
        return batches
    return WithSFTMix(batches, sft_mix_data(ctx, tok, c.ptx_pool), tok.pad_id, c.ptx_rows, seed)


def add_sft_mix(loss: torch.Tensor, metrics: dict, model, b: dict, coef: float) -> torch.Tensor:
    """`loss` + coef x the SFT loss of the batch's `ptx` part where it has one (logged as ptx_loss)."""
    if "ptx" not in b:
        return loss
    ptx = sft_mix_loss(model, b["ptx"])
    metrics["ptx_loss"] = ptx.detach()
    return loss + coef * ptx


def train_curve(rd, stage: str, keys: tuple[str, ...]) -> list[dict]:
    """Per logged step, the given figures of logs/<stage>.jsonl's training records (one uninterrupted run)."""
    path = Path(rd.logs) / f"{stage}.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("kind") == "train":
                out.append({"step": rec["step"], **{k: rec.get(k) for k in keys}})
    return out


def write_curves(rd, stage: str, result: TrainResult, steps: list[dict], extra: dict | None = None) -> dict:
    """RUN_DIR/eval/<stage>_train.json and this stage's entry of eval/rl_curves.json: per step reward and KL
    (`steps`), gold char_f1 at every evaluation, and which step final/ holds."""
    entry = {"steps": steps, "gold": [{"step": e["step"], "gold_char_f1": e.get("gold_char_f1"),
                                       "gold_eos_rate": e.get("gold_eos_rate"), "gold_gain_lo": e.get("gold_gain_lo")}
                                      for e in result.evals],
             "selected_step": result.selected_step, "trained_steps": result.step, "stopped": result.stopped,
             **(extra or {})}
    rd.eval.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rd.eval / f"{stage}_train.json", entry)
    path = rd.eval / CURVES_FILE
    try:
        curves = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        curves = {}
    curves[stage] = entry
    atomic_write_json(path, curves)
    return entry


def first_last(history: list[dict], key: str) -> str:
    """A figure at the first and the last rollout that logged it, for a summary row ("0.293 → 0.289")."""
    vals = [h[key] for h in history if h.get(key) is not None]
    return f"{vals[0]:.3f} → {vals[-1]:.3f}" if vals else "-"


def finish(run, rd, stage: str, result: TrainResult, rows: list[list] | None = None) -> None:
    """The stage's summary table and its record."""
    gold = [e for e in result.evals if "gold_char_f1" in e]
    rows = (rows or []) + summary_rows(result)
    if gold:
        rows.append(["gold char_f1 by step", ", ".join(f"{e['step']}: {e['gold_char_f1']:.3f}" for e in gold)])
    if result.selected_step == 0:
        rows.append(["final/", "the SFT model: no trained step's gold gain over it had its 95 % interval above 0 "
                               "(step-N/ keep them)"])
    table(["", stage], rows, title=f"{stage}: done → {rd / stage / 'final'}")
    # gold_char_f1: of the weights final/ holds (the kept step's, SFT's when step 0 was kept)
    run.complete({"selected_step": result.selected_step, "stopped": result.stopped,
                  "gold_char_f1": result.kept_eval.get("gold_char_f1"),
                  "best_trained_gold_char_f1": max((e["gold_char_f1"] for e in gold if e["step"] > 0), default=None),
                  "sft_gold_char_f1": next((e["gold_char_f1"] for e in gold if e["step"] == 0), None)})
