"""`zero-chatgpt pretrain`: next-token pretraining on the token shards, through the one loop.

Data: the tokenizer stage's shards (`RUN_DIR/tokens/train-*.bin`, documents each ending
with <|endoftext|>) are read memory-mapped and cut into blocks of seq_len + 1 tokens
(consecutive blocks overlap by one token, so every token is a target exactly once per
epoch; documents are packed across block boundaries, as the seed and GPT-2 do). Each epoch
visits every block once in an order shuffled by (seed, epoch); the k-th sequence of the
run is therefore a pure function of (seed, k), and a step's batch a pure function of
(seed, step, rank, world) — the property exact resume and rank-independent DDP rely on.

Eval: mean loss over the first `eval_tokens` of the val split and bits per character
(loss in bits x target tokens / characters of the decoded targets), the unit that
compares across tokenizers.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import folder_fingerprint
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.rundir import Context, inputs_or_recorded
from zero_chatgpt.core.train_settings import PretrainSection
from zero_chatgpt.model import token_shards as tokens_mod
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.losses import LMLoss, lm_loss
from zero_chatgpt.model.transformer import Transformer, model_config_from
from zero_chatgpt.train import loop, recipe
from zero_chatgpt.train.train_log import print_summary


class PackedBlocks:
    """Blocks of seq_len + 1 tokens over a list of shards; `batch(...)` gives (B, seq_len) inputs/labels."""

    def __init__(self, shards: list, seq_len: int, seed: int, micro_batch_size: int, grad_accum: int):
        self.shards, self.T, self.seed = shards, seq_len, seed
        self.mbs, self.accum = micro_batch_size, grad_accum
        counts = np.array([max(0, (s.n_tokens - 1) // seq_len) for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.n_blocks = int(self.starts[-1])
        if self.n_blocks == 0:
            raise UserError(f"the train token shards hold fewer than seq_len + 1 = {seq_len + 1} tokens; "
                            f"lower pretrain.seq_len or add data")
        self._epoch, self._perm = -1, None

    def block(self, b: int) -> np.ndarray:
        s = int(np.searchsorted(self.starts, b, side="right") - 1)
        off = (b - int(self.starts[s])) * self.T
        return np.asarray(self.shards[s].tokens[off:off + self.T + 1], dtype=np.int64)

    def sequence(self, k: int) -> np.ndarray:
        """The k-th training sequence of the run (epochs of shuffled blocks)."""
        epoch, i = divmod(k, self.n_blocks)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._epoch = epoch
        return self.block(int(self._perm[i]))

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict:
        # The step's global batch is sequences [step * G, (step + 1) * G); (micro, rank) takes
        # a contiguous slice, so any (accumulation x ranks) split of G sees the same sequences.
        G = self.mbs * self.accum * world
        first = step * G + (micro * world + rank) * self.mbs
        rows = np.stack([self.sequence(first + j) for j in range(self.mbs)])
        x = torch.from_numpy(rows)
        return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def epochs(self, steps: int, world: int) -> float:
        return steps * self.mbs * self.accum * world / self.n_blocks


def lm_loss_fn(model, batch):
    """The loop's loss seam for language modelling (pretraining)."""
    loss, n = lm_loss(model, batch["input_ids"], batch["labels"])
    return loss, {}, n


class ValEval:
    """Validation loss and bits per character on a fixed slice of the val split."""

    def __init__(self, shards: list, seq_len: int, eval_tokens: int, batch_size: int, tokenizer):
        parts, need = [], eval_tokens + 1
        for s in shards:   # only the first eval_tokens + 1 tokens are read
            if need <= 0:
                break
            parts.append(np.asarray(s.tokens[:need], dtype=np.int64))
            need -= len(parts[-1])
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        n_blocks = max(0, min(len(stream) - 1, eval_tokens) // seq_len)
        if n_blocks == 0 and len(stream) > 1:   # a tiny val split: one shorter block
            seq_len, n_blocks = len(stream) - 1, 1
        self.blocks = [stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n_blocks)]
        self.batch_size = batch_size
        self.n_tokens = n_blocks * seq_len
        self.n_chars = sum(len(tokenizer.decode(b[1:].tolist())) for b in self.blocks) if tokenizer else 0

    def __call__(self, model) -> dict:
        if not self.blocks:
            return {}
        device = next(model.parameters()).device
        total = 0.0
        for i in range(0, len(self.blocks), self.batch_size):
            x = torch.from_numpy(np.stack(self.blocks[i:i + self.batch_size])).to(device)
            total += float(model(x[:, :-1], output=LMLoss(x[:, 1:])))
        loss = total / self.n_tokens
        out = {"val_loss": loss}
        if self.n_chars:
            out["val_bpc"] = loss / math.log(2) * self.n_tokens / self.n_chars
        return out


SAMPLE_PROMPTS = ["中国", "今天", "北京", "经济", "这部电影", "一个人"]


def write_samples(model: Transformer, tokenizer, n: int, max_new: int, seed: int) -> list[dict]:
    prompts = SAMPLE_PROMPTS[:n]
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    gens = generate(model, [tokenizer.encode(p) for p in prompts], max_new_tokens=max_new, temperature=0.8,
                    top_k=50, top_p=0.95, repetition_penalty=1.1, stop_ids=(tokenizer.eot_id,),
                    tokenizer=tokenizer, generator=g)
    return [{"prompt": p, "text": p + g_.text} for p, g_ in zip(prompts, gens)]


def grad_accum_for(section: PretrainSection, world: int) -> int:
    per_pass = section.micro_batch_size * section.seq_len * world
    if section.batch_tokens % per_pass:
        raise UserError(f"pretrain.batch_tokens {section.batch_tokens} is not a multiple of micro_batch_size x "
                        f"seq_len x ranks = {per_pass}; change pretrain.batch_tokens or micro_batch_size")
    return loop.grad_accum(section.batch_tokens, section.micro_batch_size * section.seq_len, world)


def run_stage(ctx: Context) -> None:
    init_from = ctx.cfg.pretrain.init_from
    extra = inputs_or_recorded(ctx, "pretrain", ["pretrain.init_from"], lambda: {
        "pretrain.init_from": folder_fingerprint(Path(init_from), ctx.run_dir.root)}) if init_from else {}
    s = recipe.start(ctx, "pretrain", extra=extra)
    if s is None:
        return
    cfg, rd, sec, mcfg, d, tok, run, out = s.cfg, s.rd, s.c, s.cfg.model, s.d, s.tok, s.run, s.out
    train_shards = tokens_mod.load_split(rd.tokens, "train")
    try:
        val_shards = tokens_mod.load_split(rd.tokens, "val")
    except UserError:
        val_shards = []
        info("pretrain: no val token shards; validation loss is skipped")

    special = dict(bos_token_id=None, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
    if sec.init_from:
        mc = ckpt.read_model_config(sec.init_from)
        if mc.vocab_size < tok.vocab_size:
            raise UserError(f"init_from {sec.init_from}: its vocabulary ({mc.vocab_size}) is smaller than the "
                            f"tokenizer's ({tok.vocab_size}); use the tokenizer those weights were trained with")
        mc.eos_token_id, mc.pad_token_id = tok.eot_id, tok.pad_id
    else:
        mc = model_config_from(mcfg, tok.vocab_size, **special)
        if sec.seq_len > mc.max_position_embeddings:
            raise UserError(f"pretrain.seq_len {sec.seq_len} > model.max_position_embeddings "
                            f"{mc.max_position_embeddings}")
    torch.manual_seed(cfg.run.seed)
    model = Transformer(mc)

    accum = grad_accum_for(sec, d.world)
    settings = s.settings(grad_accum=accum, seed=cfg.run.seed)
    batches = PackedBlocks(train_shards, sec.seq_len, cfg.run.seed, sec.micro_batch_size, accum)
    evaluator = ValEval(val_shards, sec.seq_len, sec.eval_tokens, sec.micro_batch_size, tok)
    step_tokens = sec.micro_batch_size * sec.seq_len * accum * d.world
    info(f"pretrain: {mc.num_params() / 1e6:.1f}M parameters, {batches.n_blocks * sec.seq_len / 1e6:.2f}M train "
         f"tokens, {settings.max_steps} steps x {step_tokens:,} tokens "
         f"({batches.epochs(settings.max_steps, d.world):.2f} epochs), {d.world} process(es) on {d.device}")
    result = s.train(settings, model=model, batches=batches, loss_fn=lm_loss_fn,
                     eval_fn=evaluator if evaluator.blocks else None, tokens_per_step=step_tokens,
                     flops_per_token=mc.flops_per_token(sec.seq_len))
    if not d.main:
        return
    model = ckpt.load_model(out / "final", device=d.device)
    samples = write_samples(model, tok, sec.samples, sec.sample_tokens, cfg.run.seed) \
        if sec.samples else []
    last = result.evals[-1] if result.evals else {}
    report = {"val_loss": last.get("val_loss"), "val_bpc": last.get("val_bpc"),
              "curve": [{"step": e["step"], "val_loss": e.get("val_loss"), "val_bpc": e.get("val_bpc")}
                        for e in result.evals],
              "samples": samples, "train_loss": result.last_loss, "steps": result.step, "tokens": result.tokens,
              "params": mc.num_params(), "precision": result.precision, "seconds": round(result.seconds, 1)}
    rd.eval.mkdir(parents=True, exist_ok=True)
    path = rd.eval / "pretrain.json"
    prev = _read_json(path)
    prev.update(report)
    atomic_write_json(path, prev)
    print_summary("pretrain", result)
    for s_ in samples[:3]:
        info(f"  sample: {s_['text'][:80]!r}")
    run.complete({k: report[k] for k in ("val_loss", "val_bpc", "train_loss", "steps", "tokens")})


def _read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
