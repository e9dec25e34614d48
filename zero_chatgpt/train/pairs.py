"""Preference pairs as the training loop sees them (reward model and DPO): encoded once, batched as a
pure function of (step, micro, rank, world) so resume is exact and DDP ranks split each global batch.

A batch holds B pairs as 2B right-padded rows, the chosen answers first, then the rejected ones, so one
forward scores both (DPO's "chosen and rejected in one forward"):
    ids     (2B, T)  prompt + answer ids
    last    (2B,)    the position of each row's last real token (what a reward model reads)
    labels  (2B, T)  labels[:, t] = ids[:, t+1] where that token belongs to the answer, else IGNORE (-100)
                     (what a sequence log-probability sums over)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zero_chatgpt.core.console import progress
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.model.losses import TokenLogProbs, answer_rows
from zero_chatgpt.model.reward_model import answer_ids, prompt_ids


@dataclass
class EncodedPairs:
    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    negatives: list[str]
    n_cut: int = 0            # pairs whose prompt was shortened to fit max_seq_len

    def __len__(self) -> int:
        return len(self.prompts)


def encode_pairs(tok, pairs: list[dict], max_len: int, desc: str = "encode pairs") -> EncodedPairs:
    """Ids of every pair; a prompt too long for max_len with its longer answer keeps its end."""
    out = EncodedPairs([], [], [], [])
    for p in progress(pairs, desc=desc, unit="pair"):
        pr = prompt_ids(tok, p["messages"])
        ch = answer_ids(tok, p["chosen"], True)
        rj = answer_ids(tok, p["rejected"], bool(p.get("rejected_ended", True)))
        room = max_len - max(len(ch), len(rj))
        if room < 4:
            ch, rj = ch[:max_len - 4], rj[:max_len - 4]
            room = 4
        if len(pr) > room:
            pr, out.n_cut = pr[-room:], out.n_cut + 1
        out.prompts.append(pr)
        out.chosen.append(ch)
        out.rejected.append(rj)
        out.negatives.append(p.get("negative", ""))
    return out


def collate(data: EncodedPairs, idx, pad_id: int) -> dict:
    prompts = [data.prompts[i] for i in idx] * 2
    answers = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
    ids, labels = answer_rows(prompts, answers, pad_id)
    last = torch.tensor([len(p) + len(a) - 1 for p, a in zip(prompts, answers)])
    return {"ids": ids, "last": last, "labels": labels}


class PairBatches:
    """The loop's batch source over pairs: epochs of seeded permutations, `micro` pairs per micro-batch."""

    def __init__(self, data: EncodedPairs, pad_id: int, micro: int, grad_accum: int, seed: int):
        if len(data) == 0:
            raise UserError("no preference pairs to train on; check RUN_DIR/rm_data/ (or rm.sources)")
        self.data, self.pad_id, self.micro, self.accum, self.seed = data, pad_id, micro, grad_accum, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.data))}
        return self._perms[epoch]

    def pairs_of(self, m: int) -> list[int]:
        """The pair indices of the m-th micro-batch of the run."""
        n = len(self.data)
        out = []
        for k in range(m * self.micro, (m + 1) * self.micro):
            epoch, i = divmod(k, n)
            out.append(int(self._perm(epoch)[i]))
        return out

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        m = (step * self.accum + micro) * world + rank
        return collate(self.data, self.pairs_of(m), self.pad_id)


def sequence_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """(2B,) summed log-probabilities of each row's answer tokens."""
    lp = model(batch["ids"], output=TokenLogProbs(batch["labels"], temperature=temperature))
    return lp.sum(-1)


def batched_indices(n: int, size: int):
    for s in range(0, n, size):
        yield list(range(s, min(n, s + size)))
