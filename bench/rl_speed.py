"""RL step speed: our GRPO and DPO steps vs TRL's GRPOTrainer and DPOTrainer, same model, same prompts.

The model is the `demo` preset's shape (or `--run-dir D`: D's SFT model and tokenizer), written as an
HF folder by `export_hf` (what `zero-chatgpt export` writes) and loaded by transformers for TRL; ours
loads the same weights. Prompts are built-in idiom questions in the chat template.

* GRPO step: `prompts` prompts x `k` sampled answers of up to `new` tokens at temperature 1 (no top-k /
  top-p), the rule reward (share of answer tokens from a fixed set: the same function for both), group
  advantages, the reference log-probs (beta 0.04), one clipped-loss update of all answers. Ours:
  train/onpolicy.RolloutBatches + grpo_loss + AdamW; TRL: GRPOTrainer with num_generations = k,
  per-device batch = prompts x k, one generation per step.
* DPO step: `pairs` preference pairs (chosen = the dictionary answer, rejected = another idiom's),
  reference log-probs of the pairs, one update. Ours: DPOBatches (reference computed the first time a
  pair is drawn: every step draws new pairs here, so every step computes it, as TRL does) + dpo_loss;
  TRL: DPOTrainer with ref_model.

Both run eagerly in fp32 on the same threads, in one process, ours first; the first step of each is
warmup and not counted; step time = the median of the rest (TRL's timed by a callback from step begin
to step end, so its dataloader setup is not charged).

    .venv/bin/python bench/rl_speed.py [--quick] [--run-dir D]

Last stdout line: JSON with grpo_speedup_vs_trl and dpo_speedup_vs_trl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("ZC_NO_PROGRESS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from zero_chatgpt.core import checkpoint as ckpt  # noqa: E402
from zero_chatgpt.core import config  # noqa: E402
from zero_chatgpt.model.transformer import Transformer, model_config_from  # noqa: E402

TARGETS = set(range(300, 340))


def share(answers) -> list[float]:
    return [sum(t in TARGETS for t in a) / max(1, len(a)) for a in answers]


def setup(a, tmp: Path):
    from zero_chatgpt.data.builtin import load_idioms
    from zero_chatgpt.export.hf import export_hf
    from zero_chatgpt.model.tokenizer import load_tokenizer, train_bpe
    idioms = [d for d in load_idioms() if d.get("explanation")][:4000]
    if a.run_dir:
        tok_dir, model_dir = a.run_dir / "tokenizer", a.run_dir / "sft" / "final"
        tok = load_tokenizer(tok_dir)
    else:
        tok = train_bpe([d["word"] + "：" + d["explanation"] for d in idioms], 4096)
        tok_dir, model_dir = tmp / "tok", tmp / "model"
        tok.save(tok_dir)
        cfg = model_config_from(config.load_preset("demo").model, tok.vocab_size)
        torch.manual_seed(0)
        ckpt.write_model_files(model_dir, Transformer(cfg).state_dict(), cfg)
    hf_dir = export_hf(model_dir, tok_dir, tmp / "hf")
    return tok, hf_dir, idioms


def timed_trl(trainer) -> list[float]:
    from transformers import TrainerCallback
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    return times


def grpo(a, tok, hf_dir, idioms, tmp) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from zero_chatgpt.core.train_settings import GRPOSection
    from zero_chatgpt.stages.grpo import GRPOScoring, grpo_loss
    from zero_chatgpt.train import loop
    from zero_chatgpt.train.onpolicy import RolloutBatches, RolloutSettings
    from zero_chatgpt.train.optim import build_optimizer
    P, k, new, steps = a.prompts, a.k, a.new, a.steps
    questions = [f"「{d['word']}」是什么意思？" for d in idioms[:P * (steps + 1)]]
    pool = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]

    class Rule:
        def score(self, prompts, answers):
            return np.array(share(answers))

    policy, ref = ckpt.load_model(hf_dir).train(), ckpt.load_model(hf_dir).eval()
    rs = RolloutSettings(prompts=P, samples_per_prompt=k, epochs=1, minibatches=1, temperature=1.0,
                         max_new_tokens=new, seed=0, gen_batch_size=P * k)
    src = RolloutBatches(rs, pool=pool, policy=policy, ref=ref, tok=tok, scoring=GRPOScoring(Rule(), None, k,
                         GRPOSection(missing_eos_penalty=0.0), tok), precision="fp32")
    loss_fn = grpo_loss(1.0, 0.2, 0.04)
    opt = build_optimizer(policy, loop.LoopSettings(lr=1e-6), torch.device("cpu"))
    ours = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        b = src(step, 0, 0, 1)
        loss, _, _ = loss_fn(policy, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ours.append(time.perf_counter() - t0)
    ours_tokens = float(b["stats"]["answer_tokens"])

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tk = AutoTokenizer.from_pretrained(hf_dir)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions])

    def reward(completion_ids, **kw):
        return share(completion_ids)
    cfg = GRPOConfig(output_dir=str(tmp / "grpo"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=P * k,
                     num_generations=k, max_completion_length=new, temperature=1.0, top_k=0, top_p=1.0, beta=0.04,
                     learning_rate=1e-6, max_steps=steps + 1, logging_steps=1000, save_strategy="no",
                     disable_dropout=True, shuffle_dataset=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg, train_dataset=ds, processing_class=tk)
    theirs = timed_trl(trainer)
    o, t = statistics.median(ours[1:]), statistics.median(theirs[1:])
    return {"ours_s": round(o, 3), "trl_s": round(t, 3), "speedup": round(t / o, 3), "answers": P * k,
            "max_new_tokens": new, "ours_mean_answer_tokens": round(ours_tokens, 1),
            "steps_s": {"ours": [round(x, 3) for x in ours], "trl": [round(x, 3) for x in theirs]}}


def dpo(a, tok, hf_dir, idioms, tmp) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from zero_chatgpt.stages.dpo import DPOBatches, dpo_loss
    from zero_chatgpt.train import loop
    from zero_chatgpt.train.optim import build_optimizer
    from zero_chatgpt.train.pairs import encode_pairs, sequence_logprobs
    B, steps = a.pairs, a.steps
    n = B * (steps + 1)
    recs = [{"messages": [{"role": "user", "content": f"「{d['word']}」是什么意思？"}], "chosen": d["explanation"],
             "rejected": idioms[(i + 7) % len(idioms)]["explanation"]} for i, d in enumerate(idioms[:n])]
    enc = encode_pairs(tok, recs, 256)
    policy = ckpt.load_model(hf_dir).train()
    src = DPOBatches(enc, tok.pad_id, B, 1, 0, ref_model=ckpt.load_model(hf_dir))
    src.pairs_of = lambda m: list(range(m * B, (m + 1) * B))      # in order: every step draws new pairs
    opt = build_optimizer(policy, loop.LoopSettings(lr=1e-6), torch.device("cpu"))
    ours = []
    for step in range(steps + 1):
        t0 = time.perf_counter()
        b = src(step, 0, 0, 1)
        loss, _ = dpo_loss(sequence_logprobs(policy, b), b["ref_logp"], 0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ours.append(time.perf_counter() - t0)

    tk = AutoTokenizer.from_pretrained(hf_dir)
    ds = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs])
    cfg = DPOConfig(output_dir=str(tmp / "dpo"), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=B,
                    beta=0.1, learning_rate=1e-6, max_steps=steps + 1, logging_steps=1000, save_strategy="no",
                    dataloader_num_workers=0, max_length=256)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                         ref_model=AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32), args=cfg,
                         train_dataset=ds, processing_class=tk)
    theirs = timed_trl(trainer)
    o, t = statistics.median(ours[1:]), statistics.median(theirs[1:])
    return {"ours_s": round(o, 3), "trl_s": round(t, 3), "speedup": round(t / o, 3), "pairs": B,
            "steps_s": {"ours": [round(x, 3) for x in ours], "trl": [round(x, 3) for x in theirs]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller steps, fewer of them (< 60 s)")
    ap.add_argument("--run-dir", type=Path, default=None, help="use this run's SFT model and tokenizer")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    a.prompts, a.k, a.new, a.pairs, a.steps = (4, 4, 32, 16, 2) if a.quick else (8, 8, 96, 32, 4)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        tok, hf_dir, idioms = setup(a, tmp)
        g = grpo(a, tok, hf_dir, idioms, tmp)
        print(json.dumps({"grpo": g}), file=sys.stderr, flush=True)
        d = dpo(a, tok, hf_dir, idioms, tmp)
        print(json.dumps({"dpo": d}), file=sys.stderr, flush=True)
    print(json.dumps({"grpo_speedup_vs_trl": g["speedup"], "dpo_speedup_vs_trl": d["speedup"], "grpo": g, "dpo": d,
                      "quick": a.quick, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
