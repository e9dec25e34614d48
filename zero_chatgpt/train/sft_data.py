"""The SFT data: built once in RUN_DIR/sft_data/ (`ensure_sft_data`, from data/chat_data.py), encoded with
the chat template and its assistant mask, cut to length, batched by length, and the SFT loss.

Truncation: a conversation longer than `max_seq_len` keeps its first `max_seq_len` tokens, ids and
mask cut at the same place. A cut answer thus ends without <|im_end|> — the model is never taught to
stop where the text was cut — and it is never replaced by anything else (the seed replaced answers
over 512 tokens by the prompt, teaching the model to copy questions with no eos). A conversation
whose first answer token lies beyond the cut has nothing to learn from and is dropped. Both are
counted in the summary.

Batches: length-grouped with a token budget. Each epoch is a seeded permutation; every window of
`group_batches` batches' worth of samples is sorted by length and cut greedily into batches whose
rows × longest row stays within `micro_batch_tokens`; the batch order is shuffled again. Rows are
right-padded (pad tokens are never targets and, under causal attention, never seen by real tokens),
so the padding is the only waste; the pad fraction is measured on the plan and reported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zero_chatgpt.core.console import progress
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import folder_fingerprint, source_fingerprints
from zero_chatgpt.core.rundir import inputs_or_recorded, read_marker, sub_key, write_sub_marker
from zero_chatgpt.data import chat_data
from zero_chatgpt.model.losses import IGNORE, lm_loss, right_pad, unlikelihood_candidates


def truncate(ids: list[int], mask: list[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """The first `max_len` tokens of a conversation, ids and mask cut together; and whether anything was cut."""
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
    if len(ids) <= max_len:
        return list(ids), list(mask), False
    return list(ids[:max_len]), list(mask[:max_len]), True


def trim_tail(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """Drop the tokens after the last answer token (the template's closing newline): they are never
    targets, so they cost compute and would make a conversation that fits look truncated."""
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    return ids[:end], mask[:end]


def to_example(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for next-token training: labels[t] = ids[t+1] where mask[t+1] == 1, else IGNORE."""
    inp = ids[:-1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return inp, labels


@dataclass
class SFTSet:
    """Encoded conversations as flat arrays: sample i is ids[off[i]:off[i+1]] with its mask."""
    ids: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    n_records: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    dropped_where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def target_tokens(self) -> int:
        # The first token is never a target (nothing precedes it).
        return int(sum(self.mask[a + 1:b].sum() for a, b in zip(self.offsets[:-1], self.offsets[1:])))


def encode_records(tok, records: list[dict], max_len: int, desc: str = "encode") -> SFTSet:
    """Encode conversations with the chat template, truncate to max_len, drop those with no target left."""
    ids_parts, mask_parts, offsets = [], [], [0]
    n_trunc = n_drop = 0
    where: list[str] = []
    for i, rec in enumerate(progress(records, desc=desc, unit="conv")):
        ids, mask = tok.encode_chat(rec["messages"], add_generation_prompt=False)
        ids, mask = trim_tail(ids, mask)
        ids, mask, cut = truncate(ids, mask, max_len)
        if sum(mask[1:]) == 0:
            n_drop += 1
            if len(where) < 5:
                where.append(str(rec.get("meta", {}).get("where", f"record {i}")))
            continue
        n_trunc += cut
        ids_parts.append(np.asarray(ids, dtype=np.int32))
        mask_parts.append(np.asarray(mask, dtype=np.int8))
        offsets.append(offsets[-1] + len(ids))
    cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
    return SFTSet(cat(ids_parts, np.int32), cat(mask_parts, np.int8), np.asarray(offsets, dtype=np.int64),
                  n_records=len(records), n_truncated=n_trunc, n_dropped=n_drop, dropped_where=where)


def collate(data: SFTSet, indices, pad_id: int) -> dict:
    """Right-padded (input_ids, labels) for the given samples; pads are ignored targets."""
    pairs = [to_example(*(a.tolist() for a in data.sample(i))) for i in indices]
    return {"input_ids": right_pad([x for x, _ in pairs], pad_id), "labels": right_pad([y for _, y in pairs], IGNORE)}


def plan_epoch(lengths: np.ndarray, micro_batch_tokens: int, seed: int, epoch: int,
               group_batches: int = 32) -> list[np.ndarray]:
    """Length-grouped batches of one epoch: a seeded permutation, sorted within windows, cut by a token budget.

    A sample's cost is its training length (len - 1). A batch's cost is rows × its longest row.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    cost = lengths - 1
    mean = max(1.0, float(cost.mean())) if len(cost) else 1.0
    window = max(1, int(group_batches * micro_batch_tokens / mean))
    batches: list[np.ndarray] = []
    for s in range(0, len(order), window):
        w = order[s:s + window]
        w = w[np.argsort(cost[w], kind="stable")]
        start, longest = 0, 0
        for j in range(len(w)):
            longest_j = max(longest, int(cost[w[j]]))
            if j > start and (j - start + 1) * longest_j > micro_batch_tokens:
                batches.append(w[start:j])
                start, longest_j = j, int(cost[w[j]])
            longest = longest_j
        if start < len(w):
            batches.append(w[start:])
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def pad_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    cost = lengths - 1
    real = sum(int(cost[b].sum()) for b in batches)
    total = sum(len(b) * int(cost[b].max()) for b in batches)
    return 1.0 - real / total if total else 0.0


class LengthGroupedBatches:
    """The loop's batch source: a pure function of (step, micro, rank, world) — exact resume, DDP-split.

    Micro-batch number m = (step * grad_accum + micro) * world + rank walks through the epochs' plans.
    """

    def __init__(self, data: SFTSet, pad_id: int, micro_batch_tokens: int, grad_accum: int, seed: int,
                 group_batches: int = 32, unlikelihood: bool = False):
        if len(data) == 0:
            raise UserError("no SFT conversations left to train on (all dropped); check sft_data/ and sft.max_seq_len")
        self.data, self.pad_id, self.grad_accum, self.seed = data, pad_id, grad_accum, seed
        self.micro_batch_tokens, self.group_batches = micro_batch_tokens, group_batches
        self.unlikelihood = unlikelihood        # add each target's negative candidates (model/losses.py)
        self.lengths = data.lengths()
        self._plans: dict[int, list[np.ndarray]] = {}
        self._counts: dict[int, int] = {}       # batches per epoch, kept for every epoch seen

    def plan(self, epoch: int) -> list[np.ndarray]:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = plan_epoch(self.lengths, self.micro_batch_tokens, self.seed, epoch,
                                            self.group_batches)
        return self._plans[epoch]

    def count(self, epoch: int) -> int:
        if epoch not in self._counts:
            self._counts[epoch] = len(self.plan(epoch))
        return self._counts[epoch]

    def indices(self, m: int) -> np.ndarray:
        epoch = 0
        while m >= self.count(epoch):
            m -= self.count(epoch)
            epoch += 1
        return self.plan(epoch)[m]

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        m = (step * self.grad_accum + micro) * world + rank
        batch = collate(self.data, self.indices(m), self.pad_id)
        if self.unlikelihood:
            batch["ul_candidates"] = unlikelihood_candidates(batch["labels"], IGNORE)
        return batch


def sft_loss(model, batch: dict, unlikelihood: float = 0.0):
    """Mean cross-entropy over the assistant tokens of the batch (labels already shifted and masked),
    plus `unlikelihood` x the token-level unlikelihood of the answer's earlier tokens (model/losses.py)."""
    loss, n = lm_loss(model, batch["input_ids"], batch["labels"], IGNORE,
                      ul_candidates=batch.get("ul_candidates"), ul_alpha=unlikelihood)
    return loss, {}, n


@torch.no_grad()
def masked_val_loss(model, data: SFTSet, pad_id: int, micro_batch_tokens: int = 4096) -> float:
    """Mean loss over every assistant token of `data` (the SFT validation loss), in length-sorted batches."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    batches = plan_epoch(data.lengths(), micro_batch_tokens, 0, 0, group_batches=1 << 30)
    total, n_total = 0.0, 0
    ctx = model.config.max_position_embeddings     # conversations encoded for a longer context: keep a prefix
    for b in batches:
        batch = collate(data, b, pad_id)
        x, y = batch["input_ids"][:, :ctx], batch["labels"][:, :ctx]
        if not (y != IGNORE).any():
            continue
        loss, n = lm_loss(model, x.to(device), y.to(device))
        total += float(loss) * n
        n_total += n
    model.train(was_training)
    return total / max(n_total, 1)


DATA_KEYS = ("sources", "eval_fraction", "rl_fraction", "val_fraction", "multi_turn_fraction", "identity_fraction",
             "min_prompt_chars", "max_prompt_chars", "dedup_threshold")


def sft_inputs(ctx) -> dict:
    """What of [sft] besides the config goes into its keys: the --source files and the init_from
    folder by content (an edited source file is noticed; a moved one is not a change)."""
    s, root = ctx.cfg.sft, ctx.run_dir.root

    def compute() -> dict:
        out = {"sft.sources": source_fingerprints(s.sources, root)}
        if s.init_from:
            out["sft.init_from"] = folder_fingerprint(Path(s.init_from), root)
        return out
    return inputs_or_recorded(ctx, "sft", ["sft.sources"] + (["sft.init_from"] if s.init_from else []), compute)


def ensure_sft_data(ctx, inputs: dict | None = None) -> dict:
    """Build RUN_DIR/sft_data/ unless it is up to date with the data keys of [sft], its sources and run.seed."""
    out = ctx.run_dir.sft_data
    inputs = inputs or sft_inputs(ctx)
    parts = {"sft": {k: getattr(ctx.cfg.sft, k) for k in DATA_KEYS if k != "sources"},
             "sources": inputs["sft.sources"], "seed": ctx.cfg.run.seed}
    if ctx.cfg.data.idioms:          # the built-in idiom world (absent: the whole dictionary)
        parts["idioms"] = ctx.cfg.data.idioms
    if ctx.cfg.sft.extra_idioms:     # absent: the key of a run made before it existed holds
        parts["extra_idioms"] = ctx.cfg.sft.extra_idioms
    key = sub_key(parts)
    done = read_marker(out)
    if not ctx.force and done.get("key") == key and (out / "stats.json").exists():
        return json.loads((out / "stats.json").read_text())
    stats = chat_data.build(ctx.cfg, out)
    write_sub_marker(out, key, {"records": stats["records"]})
    return stats
