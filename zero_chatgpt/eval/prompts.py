"""The held-out prompt sets and the one way they are asked.

sft_data/eval.jsonl holds the questions of the eval idioms, which no SFT, RM or RL record contains. They
are split in two parts by a stable hash of the idiom (`meta.idiom`, else the question), so all questions
of one idiom land together: the *gold* part (a share eval.gold_fraction; `gold_prompts`) is what RL
stages select their checkpoints on, the *test* part (`report_prompts`) is what the eval stage reports,
so a checkpoint chosen for its gold score is not also judged on it."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import xxhash

from zero_chatgpt.core import config
from zero_chatgpt.core.console import progress
from zero_chatgpt.data.chat_data import read_split
from zero_chatgpt.model.generate import generate
from zero_chatgpt.train.rollout import prompt_limit

GOLD_SALT = b"zero-chatgpt eval gold part:"


def prompt_group(rec: dict) -> str:
    """What keeps prompts together in one part: the idiom (all its questions), else the question."""
    return rec.get("meta", {}).get("idiom") or question_of(rec)


def is_gold(rec: dict, gold_fraction: float) -> bool:
    """Whether a record is in the gold part: a stable hash of its group (independent of the run seed and
    of the hash that chose the eval idioms, so the parts are an unbiased split of them)."""
    return xxhash.xxh64_intdigest(GOLD_SALT + prompt_group(rec).encode()) / 2.0 ** 64 < gold_fraction


def split_eval(records: list[dict], gold_fraction: float) -> tuple[list[dict], list[dict]]:
    """(gold, test): the two disjoint parts of the eval records, by idiom."""
    gold, test = [], []
    for r in records:
        (gold if is_gold(r, gold_fraction) else test).append(r)
    return gold, test


def _root(run_dir) -> Path:
    """The folder of a RunDir or a path (a Path has a .root too: "/")."""
    return Path(run_dir) if isinstance(run_dir, (str, os.PathLike)) else Path(run_dir.root)


def _gold_fraction_of(run_dir) -> float:
    return config.saved_config(_root(run_dir)).eval.gold_fraction


def gold_prompts(run_dir, n: int, seed: int, gold_fraction: float | None = None) -> list[dict]:
    """Up to n records of the eval split's gold part (the kinds taken in turn, as `select_prompts`), for an
    RL stage to select its checkpoints on; `zero-chatgpt eval` never reports them. gold_fraction: the run's
    eval.gold_fraction (pass cfg.eval.gold_fraction; None reads it from RUN_DIR/config.toml)."""
    root = _root(run_dir)
    frac = _gold_fraction_of(root) if gold_fraction is None else float(gold_fraction)
    gold, _ = split_eval(read_split(root / "sft_data", "eval"), frac)
    return select_prompts(gold, n, seed)


def report_prompts(run_dir, n: int, seed: int, gold_fraction: float) -> list[dict]:
    """Up to n records of the test part: what `zero-chatgpt eval` reports."""
    root = _root(run_dir)
    _, test = split_eval(read_split(root / "sft_data", "eval"), gold_fraction)
    return select_prompts(test, n, seed)


def prompt_id(rec: dict) -> str:
    """A stable id of a prompt (its messages and reference), to pair two stages' answers."""
    return xxhash.xxh64_hexdigest(json.dumps([rec["messages"], rec.get("reference", "")], ensure_ascii=False,
                                             sort_keys=True).encode())[:12]


def select_prompts(records: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n eval records, the kinds taken in turn (each kind in a seeded order), so every kind is represented."""

    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("meta", {}).get("kind", "chat"), []).append(r)
    rng = random.Random(seed)
    for k in sorted(by_kind):
        rng.shuffle(by_kind[k])
    out: list[dict] = []
    kinds = sorted(by_kind)
    i = 0
    while len(out) < n and any(by_kind.values()):
        k = kinds[i % len(kinds)]
        if by_kind[k]:
            out.append(by_kind[k].pop())
        i += 1
    return out


def question_of(rec: dict) -> str:
    return next(m["content"] for m in reversed(rec["messages"]) if m["role"] == "user")


def plain_prompt(rec: dict) -> str:
    """The question as plain text for a model that has never seen the chat template (pretrain)."""
    return f"问：{question_of(rec)}\n答："


def encode_prompts(tok, records: list[dict], *, chat: bool, limit: int) -> tuple[list[list[int]], int]:
    """The prompt ids of each record (chat template or `plain_prompt`), cut to their last `limit` tokens,
    and how many were cut."""
    prompts, cut = [], 0
    for r in records:
        ids = tok.encode_chat(r["messages"], add_generation_prompt=True)[0] if chat else tok.encode(plain_prompt(r))
        if len(ids) > limit:      # keep the end: the question and the generation prompt
            ids, cut = ids[-limit:], cut + 1
        prompts.append(ids)
    return prompts, cut


def answer_prompts(model, tok, records: list[dict], *, chat: bool, max_new_tokens: int, batch_size: int,
                   repetition_penalty: float = 1.0, desc: str = "answer"):
    """Greedy answers (Generation objects, in record order) and how many prompts were cut to fit the context.
    With repetition_penalty != 1 the argmax is taken over CTRL-penalized scores (still deterministic).

    Chat stages get the chat template with the generation prompt and stop at <|im_end|>/<|endoftext|>;
    pretrain gets `plain_prompt` and also stops at the end of the line (its natural end of an answer).
    """

    prompts, cut = encode_prompts(tok, records, chat=chat, limit=prompt_limit(model, max_new_tokens))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))   # similar lengths: little left padding
    gens = [None] * len(prompts)
    bar = progress(total=len(prompts), desc=desc, unit="answer")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        outs = generate(model, [prompts[i] for i in idx], max_new_tokens=max_new_tokens, temperature=0.0,
                        repetition_penalty=repetition_penalty, stop_ids=tok.stop_ids,
                        stop_strings=() if chat else ("\n",), tokenizer=tok)
        for i, g in zip(idx, outs):
            gens[i] = g
        bar.update(len(idx))
    bar.close()
    return gens, cut
