"""`zero-chatgpt sft`: instruction tuning on the chat data, through the one training loop.

The recipe: build (or reuse) RUN_DIR/sft_data/ (data/chat_data.py), encode each conversation with
the tokenizer's ChatML template — `encode_chat` gives the ids and the assistant mask (1 on each
assistant message's content and its closing <|im_end|>) — and train on the assistant tokens only,
starting from pretrain/final (or `sft.init_from`). Resume, DDP, logging and checkpoints are the loop's
(train/loop.py); this module supplies a batch source and a loss.

The loss: cross-entropy on the assistant tokens plus `sft.unlikelihood` x token-level unlikelihood
(Welleck et al. 2019): at each answer token, the distinct tokens the answer already used are pushed
down, so a small model learns not to say them again where the data does not (model/losses.py; plain greedy
repetition on the demo 0.17 -> 0.025 at equal validation loss). Validation loss is cross-entropy only.

Encoding, truncation and batches: train/sft_data.py.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.checkpoint import stage_model_path
from zero_chatgpt.core.console import info, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.data.chat_data import read_split
from zero_chatgpt.model.transformer import Transformer
from zero_chatgpt.train import loop, recipe
from zero_chatgpt.train.sft_data import LengthGroupedBatches, encode_records, ensure_sft_data, masked_val_loss, pad_fraction, sft_inputs, sft_loss
from zero_chatgpt.train.train_log import summary_rows

# ---------------------------------------------------------------- encoding + truncation


# ---------------------------------------------------------------- batching


# ---------------------------------------------------------------- the stage


def init_path(ctx) -> Path:
    s = ctx.cfg.sft
    path = Path(s.init_from) if s.init_from else stage_model_path(ctx.run_dir, "pretrain")
    if not (path / "config.json").exists():
        if s.init_from:
            raise UserError(f"sft.init_from = {path}: no model there (expected a checkpoint folder with config.json)")
        raise UserError(f"no pretrained model at {path}: run `zero-chatgpt pretrain --run-dir {ctx.run_dir.root}` "
                        f"first (or point --set sft.init_from=PATH at a checkpoint)")
    return path


def run_stage(ctx) -> None:
    t0 = time.perf_counter()
    inputs = sft_inputs(ctx)
    st = recipe.start(ctx, "sft", extra=inputs, reads=("tokenizer",) if ctx.cfg.sft.init_from else None)
    if st is None:
        return
    cfg, rd, s, d, tok, run = st.cfg, st.rd, st.c, st.d, st.tok, st.run
    src = init_path(ctx)
    st.on_main_then_wait(lambda: ensure_sft_data(ctx, inputs))    # one process writes sft_data/
    stats = json.loads((rd.sft_data / "stats.json").read_text())
    model_cfg = ckpt.read_model_config(src)
    # A chat model ends its turn with <|im_end|>; keep <|endoftext|> too (HF generation stops at either).
    model_cfg.eos_token_id, model_cfg.pad_token_id = [tok.im_end_id, tok.eot_id], tok.pad_id
    if tok.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model at {src} only {model_cfg.vocab_size}; "
                        f"retrain pretrain with this tokenizer")
    max_len = min(s.max_seq_len, model_cfg.max_position_embeddings)
    train_recs = read_split(rd.sft_data, "train")
    if s.max_train_samples and len(train_recs) > s.max_train_samples:
        train_recs = train_recs[:s.max_train_samples]        # the file is already shuffled
    train = encode_records(tok, train_recs, max_len, desc="encode sft train")
    val = encode_records(tok, read_split(rd.sft_data, "val")[:s.val_samples], max_len, desc="encode sft val")

    micro = s.micro_batch_tokens
    grad_accum = loop.grad_accum(s.batch_tokens, micro, d.world)
    settings = st.settings(grad_accum=grad_accum, seed=cfg.run.seed, init_from=str(src))
    ul = s.unlikelihood
    batches = LengthGroupedBatches(train, tok.pad_id, micro, grad_accum, cfg.run.seed, unlikelihood=ul > 0)
    pad = pad_fraction(batches.lengths, batches.plan(0))
    steps_per_epoch = len(batches.plan(0)) / (grad_accum * d.world)
    info(f"sft: {len(train):,} conversations, {train.target_tokens():,} assistant tokens, "
         f"{len(batches.plan(0)):,} micro-batches per epoch, pad fraction {pad:.1%}, "
         f"{settings.max_steps / max(steps_per_epoch, 1e-9):.2f} epochs")

    model = Transformer(model_cfg)
    eval_fn = (lambda m: {"val_loss": masked_val_loss(m, val, tok.pad_id, micro)}) if len(val) else None
    result = st.train(settings, model=model, batches=batches, loss_fn=functools.partial(sft_loss, unlikelihood=ul),
                      eval_fn=eval_fn, meta={"init_from": str(src)},
                      tokens_per_step=int((train.lengths() - 1).sum() / len(batches.plan(0))) * grad_accum * d.world)
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
        rows += summary_rows(result)
        table(["", "sft"], rows, title=f"sft: done → {result.final}")
