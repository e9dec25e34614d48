"""Run directories written by the version before stage records (commit 979da15): adopt their records.

That version recorded in `<out>/.stage.json` only a key: a hash of whole config sections and the
keys of the stages read, with sources by path, size and mtime. Such a record is adopted, i.e.
rewritten in today's form with today's closure, when the old key recomputed from the run's saved
config and the (old) keys upstream is the recorded one: the stage was built from exactly this
config, so nothing needs rebuilding or retraining. Otherwise it is left as it is, and the stage's
usual rules apply (a derived stage is rebuilt; a trained one refuses without --force).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zero_chatgpt.console import info

# the [sft] keys that decided sft_data/ in that version
_SFT_DATA_KEYS = ("sources", "eval_fraction", "rl_fraction", "val_fraction", "multi_turn_fraction",
                  "identity_fraction", "min_prompt_chars", "max_prompt_chars", "dedup_threshold")


def _as_then(cfg: dict, section: str):
    """The section as that version saw it: keys added since (config.Rule.added_at) are left out at the
    value that gives that version's behaviour."""
    from zero_chatgpt.config import RULES
    rules, sec = RULES.get(section, {}), cfg.get(section, {})
    if not isinstance(sec, dict):      # a plain value hashed beside the sections (the sft data's seed)
        return sec
    return {k: v for k, v in sec.items()
            if not (k in rules and rules[k].added_at is not None and v == rules[k].added_at)}


def _marker(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / ".stage.json").read_text())
    except (OSError, ValueError):
        return {}


def _old_key_of(folder: Path) -> str:
    """An upstream's key as that version wrote it (kept as legacy_key when it was adopted)."""
    m = _marker(folder)
    return str(m.get("legacy_key") or m.get("key", "missing"))


def _stage_key(cfg: dict, sections, upstream=(), extra=None) -> str:
    """That version's rundir.stage_key, verbatim in effect."""
    h = hashlib.sha256()
    h.update(json.dumps({s: _as_then(cfg, s) for s in sections}, sort_keys=True).encode())
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for up in upstream:
        h.update(_old_key_of(up).encode())
    return h.hexdigest()[:16]


def _data_inputs(cfg: dict) -> dict:
    from zero_chatgpt.data.sources import parse_source
    out = []
    for spec in cfg["sources"]:
        src = parse_source(spec)
        files = [src.path] if src.path.is_file() else sorted(p for p in src.path.rglob("*") if p.is_file())
        out.append([spec, [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]])
    return {"sources": out}


def old_keys(ctx, name: str) -> dict[Path, str] | None:
    """{folder: the key that version would record there} for stage `name` under today's config."""
    cfg, rd = ctx.cfg, ctx.run_dir
    if name == "data":
        return {rd.data: _stage_key(cfg, ["data"], extra=_data_inputs(cfg["data"]))}
    if name == "tokenizer":
        tok = _stage_key(cfg, ["tokenizer"], [rd.data])
        return {rd.tokenizer: tok, rd.tokens: _stage_key(cfg, ["tokenizer"], [rd.tokenizer], extra={"tokenizer": tok})}
    if name == "pretrain":
        return {rd / "pretrain": _stage_key(cfg, ["model", "pretrain"], [rd.tokenizer, rd.tokens],
                                            extra={"seed": cfg["run"]["seed"]})}
    if name == "sft" and not cfg["sft"].get("init_from"):
        data = _stage_key({"sft": {k: cfg["sft"].get(k) for k in _SFT_DATA_KEYS}, "seed": cfg["run"]["seed"]},
                          ["sft", "seed"])
        src = rd.root / "pretrain" / "final"
        return {rd.sft_data: data, rd / "sft": _stage_key(cfg, ["sft", "run"], [rd.sft_data, rd.tokenizer, src.parent],
                                                          extra={"init_from": str(src)})}
    return None


def adopt(ctx, stage, marker: dict, closure: dict, out: Path) -> dict | None:
    """Today's record for a stage an earlier version finished, if its old key still fits (else None)."""
    from zero_chatgpt.rundir import _write_marker, closure_key, output_id
    try:
        want = old_keys(ctx, stage.name)
    except Exception:   # noqa: BLE001 - a source gone, a config that no longer resolves: not adoptable
        return None
    if not want or any(_old_key_of(folder) != key for folder, key in want.items()):
        return None
    if stage.model and not (out / "final" / "config.json").exists():
        return None
    if stage.model:
        # that version wrote final/ without a manifest: write one now, from what is there
        from zero_chatgpt import manifest
        final = out / "final"
        if manifest.read(final) is None:
            manifest.write(final, manifest.describe(final, [p.name for p in final.iterdir() if p.is_file()]))
    key = closure_key(closure)
    record = {"stage": stage.name, "state": "complete", "key": key, "closure": closure, "reads": list(stage.reads),
              "output": output_id(stage, out, key), "legacy_key": marker.get("key"), "finished": marker.get("finished"),
              "summary": marker.get("summary", {})}
    _write_marker(out, record)
    info(f"{stage.name}: adopted the record an earlier version wrote in {out}")
    return record
