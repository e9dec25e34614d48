"""`zero-chatgpt sft`: instruction tuning on the chat data, through the one training loop.

The recipe: build (or reuse) RUN_DIR/sft_data/ (data/chat_data.py), encode each conversation with
the tokenizer's ChatML template — `encode_chat` gives the ids and the assistant mask (1 on each
assistant message's content and its closing <|im_end|>) — and train on the assistant tokens only,
starting from pretrain/final (or `sft.init_from`). Resume, DDP, logging and checkpoints are the loop's
(train/loop.py); this module supplies a batch source and a loss.

The loss: cross-entropy on the assistant tokens plus `sft.unlikelihood` x token-level unlikelihood
(Welleck et al. 2019): at each answer token, the distinct tokens the answer already used are pushed
down, so a small model learns not to say them again where the data does not (loss.py; plain greedy
repetition on the demo 0.17 -> 0.025 at equal validation loss). Validation loss is cross-entropy only.

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

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from zero_chatgpt.core.console import UserError, info, progress, table
from zero_chatgpt.core.rundir import begin, folder_fingerprint, inputs_or_recorded, read_marker, source_fingerprints, sub_key, write_sub_marker

IGNORE = -100


# ---------------------------------------------------------------- encoding + truncation

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
    T = max(len(p[0]) for p in pairs)
    inp = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    lab = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for r, (x, y) in enumerate(pairs):
        inp[r, :len(x)] = torch.tensor(x)
        lab[r, :len(y)] = torch.tensor(y)
    return {"input_ids": inp, "labels": lab}


# ---------------------------------------------------------------- batching

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
        self.unlikelihood = unlikelihood        # add each target's negative candidates (loss.py)
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
            from zero_chatgpt.model.losses import unlikelihood_candidates
            batch["ul_candidates"] = unlikelihood_candidates(batch["labels"], IGNORE)
        return batch


def sft_loss(model, batch: dict, unlikelihood: float = 0.0):
    """Mean cross-entropy over the assistant tokens of the batch (labels already shifted and masked),
    plus `unlikelihood` x the token-level unlikelihood of the answer's earlier tokens (loss.py)."""
    from zero_chatgpt.model.losses import lm_loss
    loss, n = lm_loss(model, batch["input_ids"], batch["labels"], IGNORE,
                      ul_candidates=batch.get("ul_candidates"), ul_alpha=unlikelihood)
    return loss, {}, n


@torch.no_grad()
def masked_val_loss(model, data: SFTSet, pad_id: int, micro_batch_tokens: int = 4096) -> float:
    """Mean loss over every assistant token of `data` (the SFT validation loss), in length-sorted batches."""
    from zero_chatgpt.model.losses import lm_loss
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


# ---------------------------------------------------------------- the stage

DATA_KEYS = ("sources", "eval_fraction", "rl_fraction", "val_fraction", "multi_turn_fraction", "identity_fraction",
             "min_prompt_chars", "max_prompt_chars", "dedup_threshold")


def sft_inputs(ctx) -> dict:
    """What of [sft] besides the config goes into its keys: the --source files and the init_from
    folder by content (an edited source file is noticed; a moved one is not a change)."""
    s, root = ctx.cfg["sft"], ctx.run_dir.root

    def compute() -> dict:
        out = {"sft.sources": source_fingerprints(s["sources"], root)}
        if s.get("init_from"):
            out["sft.init_from"] = folder_fingerprint(Path(s["init_from"]), root)
        return out
    return inputs_or_recorded(ctx, "sft", ["sft.sources"] + (["sft.init_from"] if s.get("init_from") else []), compute)


def ensure_sft_data(ctx, inputs: dict | None = None) -> dict:
    """Build RUN_DIR/sft_data/ unless it is up to date with the data keys of [sft], its sources and run.seed."""
    from zero_chatgpt.data import chat_data
    out = ctx.run_dir.sft_data
    inputs = inputs or sft_inputs(ctx)
    parts = {"sft": {k: ctx.cfg["sft"].get(k) for k in DATA_KEYS if k != "sources"},
             "sources": inputs["sft.sources"], "seed": ctx.cfg["run"]["seed"]}
    if int(ctx.cfg["data"].get("idioms", 0)):          # the built-in idiom world (absent: the whole dictionary)
        parts["idioms"] = int(ctx.cfg["data"]["idioms"])
    if int(ctx.cfg["sft"].get("extra_idioms", 0)):     # absent: the key of a run made before it existed holds
        parts["extra_idioms"] = int(ctx.cfg["sft"]["extra_idioms"])
    key = sub_key(parts)
    done = read_marker(out)
    if not ctx.force and done.get("key") == key and (out / "stats.json").exists():
        return json.loads((out / "stats.json").read_text())
    stats = chat_data.build(ctx.cfg, out)
    write_sub_marker(out, key, {"records": stats["records"]})
    return stats


def init_path(ctx) -> Path:
    from zero_chatgpt.core.checkpoint import stage_model_path
    s = ctx.cfg["sft"]
    path = Path(s["init_from"]) if s.get("init_from") else stage_model_path(ctx.run_dir, "pretrain")
    if not (path / "config.json").exists():
        if s.get("init_from"):
            raise UserError(f"sft.init_from = {path}: no model there (expected a checkpoint folder with config.json)")
        raise UserError(f"no pretrained model at {path}: run `zero-chatgpt pretrain --run-dir {ctx.run_dir.root}` "
                        f"first (or point --set sft.init_from=PATH at a checkpoint)")
    return path


def run_stage(ctx) -> None:
    import time

    from zero_chatgpt.core import checkpoint as ckpt
    from zero_chatgpt.data.chat_data import read_split
    from zero_chatgpt.model.transformer import Transformer
    from zero_chatgpt.model.tokenizer import load_tokenizer
    from zero_chatgpt.train import loop

    t0 = time.perf_counter()
    cfg, rd, s = ctx.cfg, ctx.run_dir, ctx.cfg["sft"]
    d = loop.setup_distributed(cfg["run"]["device"])
    inputs = sft_inputs(ctx)
    run = begin(ctx, "sft", extra=inputs, reads=("tokenizer",) if s.get("init_from") else None)
    if run.skip:
        return
    src = init_path(ctx)
    if d.main:                      # one process writes sft_data/; the others wait, then read it
        ensure_sft_data(ctx, inputs)
    if d.world > 1:
        torch.distributed.barrier()
    stats = json.loads((rd.sft_data / "stats.json").read_text())
    out = rd.stage_dir("sft")

    tok = load_tokenizer(rd.tokenizer)
    model_cfg = ckpt.read_model_config(src)
    # A chat model ends its turn with <|im_end|>; keep <|endoftext|> too (HF generation stops at either).
    model_cfg.eos_token_id, model_cfg.pad_token_id = [tok.im_end_id, tok.eot_id], tok.pad_id
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model at {src} only {model_cfg.vocab_size}; "
                        f"retrain pretrain with this tokenizer")
    max_len = min(int(s["max_seq_len"]), model_cfg.max_position_embeddings)
    train_recs = read_split(rd.sft_data, "train")
    if s["max_train_samples"] and len(train_recs) > s["max_train_samples"]:
        train_recs = train_recs[:s["max_train_samples"]]        # the file is already shuffled
    train = encode_records(tok, train_recs, max_len, desc="encode sft train")
    val = encode_records(tok, read_split(rd.sft_data, "val")[:s["val_samples"]], max_len, desc="encode sft val")

    micro = int(s["micro_batch_tokens"])
    grad_accum = max(1, int(s["batch_tokens"]) // (micro * d.world))
    settings = loop.LoopSettings.from_section(s, grad_accum=grad_accum, seed=int(cfg["run"]["seed"]),
                                              init_from=str(src), schedule_steps=run.schedule_steps)
    ul = float(s["unlikelihood"])
    batches = LengthGroupedBatches(train, tok.pad_id, micro, grad_accum, int(cfg["run"]["seed"]), unlikelihood=ul > 0)
    pad = pad_fraction(batches.lengths, batches.plan(0))
    steps_per_epoch = len(batches.plan(0)) / (grad_accum * d.world)
    info(f"sft: {len(train):,} conversations, {train.target_tokens():,} assistant tokens, "
         f"{len(batches.plan(0)):,} micro-batches per epoch, pad fraction {pad:.1%}, "
         f"{settings.max_steps / max(steps_per_epoch, 1e-9):.2f} epochs")

    model = Transformer(model_cfg)
    eval_fn = (lambda m: {"val_loss": masked_val_loss(m, val, tok.pad_id, micro)}) if len(val) else None
    result = loop.train(settings, model=model, stage="sft", stage_dir=out, log_dir=rd.logs, batches=batches,
                        loss_fn=functools.partial(sft_loss, unlikelihood=ul), eval_fn=eval_fn, dist_info=d,
                        tokens_per_step=int((train.lengths() - 1).sum() / len(batches.plan(0))) * grad_accum * d.world,
                        meta={"init_from": str(src), "stage_key": run.key})
    summary = {"records": stats["records"], "dropped_records": stats.get("dropped", {}),
               "conversations": len(train), "truncated": train.n_truncated, "dropped_no_target": train.n_dropped,
               "pad_fraction": pad, "epochs": settings.max_steps / max(steps_per_epoch, 1e-9),
               "final_loss": result.last_loss, "val_loss": result.evals[-1].get("val_loss") if result.evals else None,
               "seconds": time.perf_counter() - t0}
    if d.main:
        run.complete(summary)
        rows = [["sft_data train / val / eval / rl", " / ".join(f"{stats['records'][k]:,}"
                                                              for k in ("train", "val", "eval", "rl"))]]
        if stats.get("extra_idioms"):
            rows.append(["idioms outside the world (train only, sft.extra_idioms)", f"{stats['extra_idioms']:,}"])
        rows += [[f"dropped: {k}", v] for k, v in stats.get("dropped", {}).items()]
        rows += [["conversations trained on", len(train)], ["truncated to max_seq_len", train.n_truncated],
                 ["dropped: no answer token within max_seq_len", train.n_dropped],
                 ["pad fraction", f"{pad:.1%}"], ["epochs", round(summary["epochs"], 3)],
                 ["unlikelihood alpha (in the train loss, not in val_loss)", ul]]
        rows += loop.summary_rows(result)
        table(["", "sft"], rows, title=f"sft: done → {result.final}")
