"""Preference pairs for the reward model and DPO: RUN_DIR/rm_data/{train,val}.jsonl.

From the RM part of the RL prompt pool (sft_data/rl.jsonl, meta.rl_part = "rm": idioms never in SFT,
never among the RL prompts, never in eval), one pair per prompt and negative kind:

    chosen    the reference, phrased as SFT answers (chat_data.answer_text), ended with <|im_end|>
    rejected  "sample"   an SFT sample at rl.temperature (not greedy: the RM must judge what RL will
                         sample, the seed's RM only ever saw greedy outputs)
              "other"    another idiom's reference of the same kind (right form, wrong content)
              "cut"      the reference cut mid-way, without <|im_end|> (the seed's truncated rollouts)
              "repeat"   the reference with a phrase of it repeated three times
              "refusal"  a refusal (抱歉，我无法回答这个问题。): what PPO drifts to when the RM allows it
              "empty"    an empty answer

The rule-made negatives teach the robustness that RLHF on a small model needs (rlhf.md: an RM that
rewarded spam, a PPO run that turned every answer into a refusal). Prompts are split into train and
val by idiom (rm.val_fraction); val pairs give the RM's accuracy and probes, never training.
A `--source preference:FILE` ({prompt, chosen, rejected} lines) is read instead of building pairs.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from zero_chatgpt.core.io import atomic_write_text
from zero_chatgpt.data.chat_data import answer_text, stable_uniform
from zero_chatgpt.data.sources import iter_records, parse_source

REFUSALS = ("抱歉，我无法回答这个问题。", "对不起，我不知道。", "作为一个人工智能助手，我无法提供这方面的信息。",
            "这个问题我无法回答，请换一个问题。", "很抱歉，我不清楚。")


def idiom_of(rec: dict) -> str:
    meta = rec.get("meta", {})
    return meta.get("idiom") or next(m["content"] for m in rec["messages"] if m["role"] == "user")


def chosen_text(rec: dict) -> str:
    """The reference as the SFT data phrases an answer (so style alone never tells chosen from rejected)."""
    meta = rec.get("meta", {})
    return answer_text(meta.get("kind", "chat"), meta.get("idiom", ""), rec["reference"])


def rm_prompts(rl_records: list[dict], limit: int, seed: int) -> list[dict]:
    """The RM part of the pool (all of it for --source pools without rl_part), at most `limit` (0 = all),
    chosen by a stable hash so that a larger limit keeps the smaller one's prompts."""
    recs = [r for r in rl_records if r.get("meta", {}).get("rl_part", "rm") == "rm" and r.get("reference")]
    recs.sort(key=lambda r: stable_uniform(seed + 7, idiom_of(r) + r.get("meta", {}).get("kind", "")))
    return recs[:limit] if limit else recs


def split_val(recs: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, val) by idiom: all questions of one idiom on one side."""
    val = [r for r in recs if stable_uniform(seed + 8, idiom_of(r)) < val_fraction]
    train = [r for r in recs if stable_uniform(seed + 8, idiom_of(r)) >= val_fraction]
    return train, val


def _cut(text: str, rng: random.Random) -> str | None:
    if len(text) < 6:
        return None
    return text[: rng.randint(max(2, int(len(text) * 0.3)), int(len(text) * 0.7))]


def _repeat(text: str, rng: random.Random) -> str | None:
    if len(text) < 6:
        return None
    n = rng.randint(2, min(6, len(text) // 2))
    i = rng.randint(0, len(text) - n)
    return text[:i + n] + text[i:i + n] * 2 + text[i:]


def negatives_for(rec: dict, kinds, rng: random.Random, others: list[str], sample: tuple[str, bool] | None
                  ) -> list[tuple[str, str, bool]]:
    """[(negative kind, rejected text, rejected ended with eos)] for one prompt."""
    chosen = chosen_text(rec)
    out = []
    for k in kinds:
        if k == "sample" and sample is not None and sample[0].strip() != chosen.strip():
            out.append((k, sample[0], sample[1]))
        elif k == "other" and others:
            other = rng.choice(others)
            if other != chosen:
                out.append((k, other, True))
        elif k == "cut" and (t := _cut(chosen, rng)):
            out.append((k, t, False))
        elif k == "repeat" and (t := _repeat(chosen, rng)):
            out.append((k, t, True))
        elif k == "refusal":
            out.append((k, rng.choice(REFUSALS), True))
        elif k == "empty":
            out.append((k, "", True))
    return out


def build_pairs(recs: list[dict], samples: list[tuple[str, bool] | None], kinds, seed: int) -> list[dict]:
    """Pairs for `recs` (samples[i]: the SFT sample for recs[i], as (text, ended))."""
    rng = random.Random(seed)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for r in recs:
        by_kind.setdefault(r.get("meta", {}).get("kind", "chat"), []).append((idiom_of(r), chosen_text(r)))
    pairs = []
    for r, smp in zip(recs, samples):
        kind = r.get("meta", {}).get("kind", "chat")
        others = [t for w, t in by_kind[kind] if w != idiom_of(r)]
        for neg, text, ended in negatives_for(r, kinds, rng, others[:200] if len(others) > 200 else others, smp):
            pairs.append({"messages": r["messages"], "chosen": chosen_text(r), "rejected": text,
                          "rejected_ended": ended, "negative": neg, "kind": kind, "idiom": idiom_of(r),
                          "reference": r["reference"]})
    return pairs


def read_source_pairs(specs: list[str], bad) -> list[dict]:
    """Pairs from --source preference:FILE ({prompt, chosen, rejected}), through the one reader layer."""
    pairs = []
    for spec in specs:
        for rec in iter_records(parse_source(spec), bad):
            pairs.append({"messages": [{"role": "user", "content": rec["prompt"]}], "chosen": rec["chosen"],
                          "rejected": rec["rejected"], "rejected_ended": True, "negative": "source",
                          "kind": "chat", "idiom": rec["prompt"], "reference": rec["chosen"]})
    return pairs


def bad_note(bad) -> str:
    """The tail of a message about read pairs: " (N bad records skipped, e.g. FILE:LINE: why; ...)", or ""."""
    if not bad.count:
        return ""
    return f" ({bad.count:,} bad records skipped, e.g. " + "; ".join(f"{x['where']}: {x['reason']}"
                                                                     for x in bad.samples[:3]) + ")"


def bad_rows(bad: dict | None, show: int = 3) -> list[list]:
    """Summary-table rows for the bad source records (a BadRecords.to_dict()): the count, then the first few
    with file:line, so a user can open the file there; none when every record was usable."""
    if not bad or not bad.get("count"):
        return []
    rows = [["bad source records (skipped)", bad["count"]]]
    return rows + [["  e.g.", f"{x['where']}: {x['reason']}"] for x in bad.get("samples", [])[:show]]


def write_pairs(path: Path, pairs: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


def read_pairs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
