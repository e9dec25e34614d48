"""`zero-chatgpt rm`: the reward model, through the one training loop.

The recipe: build (or reuse) the preference pairs (data/preference.py: chosen = the reference,
rejected = an SFT sample or a rule-made negative), start from the SFT model's backbone with a new
scalar head (ModelConfig.head = "score", init std 1/sqrt(d+1) as TRL and OpenRLHF do), and minimize the
Bradley-Terry loss on the score at each answer's last real token (model/reward_model.py). Then:

* normalization: a gain and bias so that the RM scores held-out SFT samples ~N(0, 1), stored beside
  the weights (rm/final/reward_norm.json) and used by every reader (rewards.RewardScorer);
* RUN_DIR/eval/rm.json: `accuracy` on held-out pairs; `probe_pass` per rule-made negative (the share of
  held-out prompts on which it scores below the reference); `gold_agreement`: on pairs of two SFT
  samples of one held-out prompt whose char_f1 against the reference differ by >= 0.2, how often the RM
  ranks them as char_f1 does. The last says whether the RM can guide RL at all, not only tell the SFT
  model's style from the reference's (the seed's 92 % accuracy was the latter).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.console import info, share, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.fingerprints import source_fingerprints
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.rundir import inputs_or_recorded, read_marker, sub_key, write_sub_marker
from zero_chatgpt.data import preference as pref
from zero_chatgpt.data.chat_data import read_split
from zero_chatgpt.data.streams import BadRecords
from zero_chatgpt.eval.metrics import char_f1
from zero_chatgpt.model.generate import answer_ended
from zero_chatgpt.model.reward_model import (
    NORM_FILE,
    Normalization,
    RewardScorer,
    answer_ids,
    bradley_terry,
    prompt_ids,
    score_model_from,
    sequence_scores,
)
from zero_chatgpt.train import loop, recipe
from zero_chatgpt.train.pairs import PairBatches, batched_indices, collate, encode_pairs
from zero_chatgpt.train.rollout import sample
from zero_chatgpt.train.train_log import summary_rows

PAIR_DATA_KEYS = ("prompts", "negatives", "val_fraction", "gold_samples", "sources")


def rm_loss(model, batch):
    """The loop's loss seam: Bradley-Terry over the batch's pairs (chosen rows first)."""
    r = sequence_scores(model, batch["ids"], batch["last"])
    half = r.shape[0] // 2
    rc, rr = r[:half], r[half:]
    return bradley_terry(rc, rr), {"accuracy": (rc > rr).float().mean(), "margin": (rc - rr).detach().mean()}, half


@torch.no_grad()
def pair_scores(model, data, pad_id: int, batch_pairs: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) raw scores of every pair."""
    device = next(model.parameters()).device
    rc, rr = np.zeros(len(data)), np.zeros(len(data))
    for idx in batched_indices(len(data), batch_pairs):
        b = collate(data, idx, pad_id)
        r = sequence_scores(model, b["ids"].to(device), b["last"]).double().cpu().numpy()
        rc[idx], rr[idx] = r[:len(idx)], r[len(idx):]
    return rc, rr


# ---------------------------------------------------------------- data

def ensure_pairs(ctx, tok, sft_path: Path) -> dict:
    """RUN_DIR/rm_data/{train,val}.jsonl and gold.jsonl (SFT samples of val prompts), unless current."""
    cfg, rd, c = ctx.cfg, ctx.run_dir, ctx.cfg.rm
    out = rd / "rm_data"
    key = sub_key({"rm": {k: getattr(c, k) for k in PAIR_DATA_KEYS if k != "sources"},
                   "sources": source_fingerprints(c.sources, rd.root), "rl": cfg.rl.values(), "seed": cfg.rl_seed(),
                   "sft": read_marker(rd / "sft").get("output")})
    if read_marker(out).get("key") == key and not ctx.force and (out / "gold.jsonl").exists():
        return read_marker(out)["summary"]
    out.mkdir(parents=True, exist_ok=True)
    seed = cfg.rl_seed()
    sft = ckpt.load_model(sft_path)
    bad = BadRecords()
    if c.sources:
        pairs = pref.read_source_pairs(c.sources, bad)
        train, val = pref.split_val(pairs, c.val_fraction, seed)
        info(f"rm data: {len(pairs):,} pairs from {', '.join(c.sources)}" + pref.bad_note(bad))
        if not train or not val:
            raise UserError(f"rm: {len(pairs):,} usable pairs in {', '.join(c.sources)} split into {len(train):,} "
                            f"train / {len(val):,} held out (rm.val_fraction = {c.val_fraction:g}){pref.bad_note(bad)}"
                            f"; both need pairs: add {{prompt, chosen, rejected}} lines or change rm.val_fraction")
    else:
        recs = pref.rm_prompts(read_split(rd.sft_data, "rl"), c.prompts, seed)
        tr, va = pref.split_val(recs, c.val_fraction, seed)
        if not tr or not va:
            raise UserError(f"rm: {len(recs)} RM prompts in {rd.sft_data / 'rl.jsonl'} are too few to split; raise "
                            f"rm.prompts or sft.rl_fraction")
        gens = sample(sft, tok, [prompt_ids(tok, r["messages"]) for r in tr + va], temperature=cfg.rl.temperature,
                      max_new_tokens=cfg.rl.max_new_tokens, seed=seed, desc="rm data: SFT samples")
        samples = [(g.text, answer_ended(g.tokens, tok.stop_ids)) for g in gens]
        train = pref.build_pairs(tr, samples[:len(tr)], c.negatives, seed)
        val = pref.build_pairs(va, samples[len(tr):], c.negatives, seed + 1)
    # gold agreement: several samples of each held-out prompt, judged by char_f1 against the reference
    val_prompts = {p["idiom"] + "\0" + p["kind"]: p for p in val}
    vp = list(val_prompts.values())
    gold = []
    for j in range(c.gold_samples):
        gens = sample(sft, tok, [prompt_ids(tok, p["messages"]) for p in vp], temperature=cfg.rl.temperature,
                      max_new_tokens=cfg.rl.max_new_tokens, seed=seed + 100 + j, desc=f"rm data: gold samples {j + 1}")
        for p, g in zip(vp, gens):
            gold.append({"messages": p["messages"], "reference": p["reference"], "kind": p["kind"],
                         "idiom": p["idiom"], "sample": j, "text": g.text, "ended": answer_ended(g.tokens, tok.stop_ids)})
    pref.write_pairs(out / "train.jsonl", train)
    pref.write_pairs(out / "val.jsonl", val)
    pref.write_pairs(out / "gold.jsonl", gold)
    summary = {"train_pairs": len(train), "val_pairs": len(val), "gold_samples": len(gold),
               "by_negative": {k: sum(p["negative"] == k for p in train) for k in c.negatives},
               "bad_records": bad.to_dict()}
    write_sub_marker(out, key, summary)
    return summary


# ---------------------------------------------------------------- evaluation

def evaluate_rm(model, tok, val_pairs: list[dict], gold: list[dict], max_len: int) -> tuple[dict, Normalization]:
    """eval/rm.json's figures and the normalization fitted on held-out SFT samples."""
    enc = encode_pairs(tok, val_pairs, max_len, desc="rm eval: pairs")
    rc, rr = pair_scores(model, enc, tok.pad_id)
    neg = np.array(enc.negatives)
    res = {"accuracy": float((rc > rr).mean()) if len(rc) else 0.0, "val_pairs": len(rc),
           "accuracy_by_negative": {k: float((rc[neg == k] > rr[neg == k]).mean()) for k in sorted(set(neg))},
           "probe_pass": {k: float((rc[neg == k] > rr[neg == k]).mean()) for k in sorted(set(neg)) if k != "sample"},
           "pairs_by_negative": {k: int((neg == k).sum()) for k in sorted(set(neg))}}
    scorer = RewardScorer(model, Normalization(), tok.pad_id, max_len=max_len)
    raw = scorer.raw([prompt_ids(tok, g["messages"]) for g in gold], [answer_ids(tok, g["text"], g["ended"]) for g in gold])
    norm = Normalization.fit(raw)
    by_prompt: dict[str, list[tuple[float, float]]] = {}
    for g, r in zip(gold, raw):
        by_prompt.setdefault(g["idiom"] + "\0" + g["kind"], []).append((char_f1(g["text"], g["reference"]), r))
    agree = total = 0
    for samples in by_prompt.values():
        for i in range(len(samples)):
            for j in range(i + 1, len(samples)):
                (fa, ra), (fb, rb) = samples[i], samples[j]
                if abs(fa - fb) >= 0.2:
                    total += 1
                    agree += (ra > rb) == (fa > fb)
    res["gold_agreement"] = agree / total if total else None
    res["gold_pairs"] = total
    res["normalization"] = {"gain": norm.gain, "bias": norm.bias, "fitted_on": norm.fitted_on}
    res["normalized_sft_samples"] = {"mean": float(np.mean(norm(raw))), "std": float(np.std(norm(raw)))}
    return res, norm


def add_to_checkpoint(folder: Path, name: str, data: dict) -> None:
    """Write `name` into a finished checkpoint folder and list it in its manifest."""
    atomic_write_json(folder / name, data)
    m = manifest.read(folder) or {"files": {}}
    m["files"].update(manifest.describe(folder, [name]))
    tmp = folder / (manifest.MANIFEST + ".tmp")
    manifest.write(folder, m["files"], name=tmp.name)
    tmp.replace(folder / manifest.MANIFEST)


# ---------------------------------------------------------------- the stage

def run_stage(ctx) -> None:
    inputs = inputs_or_recorded(ctx, "rm", ["rm.sources"], lambda: {
        "rm.sources": source_fingerprints(ctx.cfg.rm.sources, ctx.run_dir.root)})
    s = recipe.start(ctx, "rm", extra=inputs)
    if s is None:
        return
    cfg, rd, c, d, tok, run = s.cfg, s.rd, s.c, s.d, s.tok, s.run
    sft_path = Path(c.init_from) if c.init_from else ckpt.stage_model_path(rd, "sft")
    s.on_main_then_wait(lambda: ensure_pairs(ctx, tok, sft_path))
    train_pairs = pref.read_pairs(rd / "rm_data" / "train.jsonl")
    val_pairs = pref.read_pairs(rd / "rm_data" / "val.jsonl")
    max_len = min(c.max_seq_len, ckpt.read_model_config(sft_path).max_position_embeddings)
    enc = encode_pairs(tok, train_pairs, max_len, desc="encode rm pairs")
    enc_val = encode_pairs(tok, val_pairs[:c.eval_pairs], max_len, desc="encode rm val pairs")
    micro = c.micro_batch_pairs
    accum = loop.grad_accum(c.batch_pairs, micro, d.world)
    settings = s.settings(grad_accum=accum, seed=cfg.rl_seed(), init_from="")
    batches = PairBatches(enc, tok.pad_id, micro, accum, cfg.rl_seed())
    info(f"rm: {len(enc):,} train pairs ({len(val_pairs):,} held out), {settings.max_steps} steps x "
         f"{micro * accum * d.world} pairs ({settings.max_steps * micro * accum * d.world / len(enc):.2f} epochs)")

    def eval_fn(m):
        rc, rr = pair_scores(m, enc_val, tok.pad_id)
        return {"val_accuracy": float((rc > rr).mean())}

    result = s.train(settings, model=score_model_from(sft_path, cfg.rl_seed()), batches=batches, loss_fn=rm_loss,
                     eval_fn=eval_fn)
    if not s.main:
        return
    model = ckpt.load_model(rd / "rm" / "final")
    gold = pref.read_pairs(rd / "rm_data" / "gold.jsonl")
    res, norm = evaluate_rm(model, tok, val_pairs, gold, max_len)
    add_to_checkpoint(rd / "rm" / "final", NORM_FILE, {"gain": norm.gain, "bias": norm.bias,
                                                       "fitted_on": norm.fitted_on})
    res.update(train_pairs=len(enc), steps=result.step, train_loss=result.last_loss, seconds=round(result.seconds, 1),
               curve=[{"step": e["step"], "val_accuracy": e.get("val_accuracy")} for e in result.evals])
    rd.eval.mkdir(parents=True, exist_ok=True)
    atomic_write_json(rd.eval / "rm.json", res)
    rows = [["held-out pairs", res["val_pairs"]], ["accuracy", share(res["accuracy"], res["val_pairs"])]]
    rows += [[f"probe_pass: {k}", share(v, res["pairs_by_negative"][k])] for k, v in res["probe_pass"].items()]
    rows += [["gold_agreement (SFT sample pairs, char_f1 apart by >= 0.2)",
              share(res["gold_agreement"], res["gold_pairs"])],
             ["normalization gain / bias", f"{norm.gain:.3f} / {norm.bias:.3f}"]]
    rows += pref.bad_rows((read_marker(rd / "rm_data").get("summary") or {}).get("bad_records"))
    rows += summary_rows(result)
    table(["", "rm"], rows, title=f"rm: done → {rd / 'rm' / 'final'} (figures in {rd.eval / 'rm.json'})")
    run.complete({k: res[k] for k in ("accuracy", "val_pairs", "probe_pass", "gold_agreement", "gold_pairs",
                                      "normalization")})


