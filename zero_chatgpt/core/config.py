"""Configuration: TOML presets, `--set section.key=value` overrides, validation.

`presets/defaults.toml` holds every key with its default and a comment that says what it
does: it is the schema. A preset (`presets/demo.toml`, ...) overrides a subset.

A run directory keeps the resolved config of its run in RUN_DIR/config.toml (the preset,
every `--set` given so far and the `--source`s), and later commands on it start from that
file: a `--source` or `--set` is given once, not at every command. `--preset` names how a
*new* run starts; naming another preset for an existing run is refused rather than
replacing its config (and, through the stage keys, its trained work).

`RULES` below gives every key its allowed values (checked with the relations between keys
before anything runs) and says whether the key changes a stage's *result*. Keys that only
change how a result is computed or reported (logging, eval and checkpoint intervals, worker
and thread counts, the device) are *operational*: they never enter a stage key, so changing
them never makes a finished stage look out of date.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import tomllib

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_text
from zero_chatgpt.data.sources import FORMATS

PRESET_DIR = Path(__file__).parents[1] / "presets"
CONFIG_FILE = "config.toml"
DEFAULT_PRESET = "demo"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p.stem != "defaults")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8 by definition; a stray byte (an editor's Latin-1 save, a damaged disk) lands here
        line = e.object[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); save the file as UTF-8 "
                        f"(or retype that line), then run the command again") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def defaults() -> dict:
    return _read_toml(PRESET_DIR / "defaults.toml")


# ---------------------------------------------------------------- value rules

@dataclass(frozen=True)
class Rule:
    """What a key allows. `check(value)` returns None when fine, else what is allowed."""
    check: Callable[[Any], str | None]
    operational: bool = False       # True: never part of a stage key (see the module docstring)
    # a key added after run directories were made with this version's records: at this value (the
    # behaviour from before it) it is left out of stage keys, so those runs' stages stay current
    added_at: Any = None


def _num(lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> Callable[[Any], str | None]:
    def check(v):
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
              (hi is not None and (v >= hi if hi_open else v > hi))
        # NaN compares false with every bound and inf passes any open-ended one: neither is ever allowed
        if not bad and not (isinstance(v, float) and not math.isfinite(v)):
            return None
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        return ("an integer " if integer else "a finite number ") + " and ".join(s for s in (lo_s, hi_s) if s)
    return check


def Int(lo=None, hi=None, **kw) -> Rule:
    return Rule(_num(lo, hi, integer=True), **kw)


def Float(lo, hi, lo_open=False, hi_open=False, **kw) -> Rule:
    """A float key in [lo, hi] (open ends with lo_open / hi_open). Both bounds are required: a value far
    beyond any sensible one (lr = 1e308) is a typo, and it is better refused now than found as a NaN
    loss hours later. The upper bounds are generous, one or more orders above any value in use."""
    return Rule(_num(lo, hi, lo_open, hi_open), **kw)


def Frac(lo_open=False, hi_open=False, **kw) -> Rule:
    return Float(0.0, 1.0, lo_open, hi_open, **kw)


def Choice(*allowed, **kw) -> Rule:
    return Rule(lambda v: None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed), **kw)


def rl_seed(cfg: dict) -> int:
    """The seed of the preference data, the reward model and the RL stages: rl.seed, or run.seed when 0."""
    return int(cfg.get("rl", {}).get("seed") or 0) or int(cfg["run"]["seed"])


def Any_(**kw) -> Rule:
    return Rule(lambda v: None, **kw)


def Each(inner: Callable[[Any], str | None], what: str, nonempty: bool = False, **kw) -> Rule:
    def check(v):
        if nonempty and not v:
            return f"a non-empty list of {what}"
        for x in v:
            why = inner(x)
            if why is not None:
                return f"a list of {what}; {x!r} is not" + (f" ({why})" if why else "")
        return None
    return Rule(check, **kw)


def _device(v: str) -> str | None:
    # "cuda" means each process's own GPU (LOCAL_RANK under torchrun); pick GPUs with CUDA_VISIBLE_DEVICES
    return None if v in ("auto", "cpu", "cuda") else "'auto', 'cpu' or 'cuda' (choose GPUs with CUDA_VISIBLE_DEVICES)"


def _source(v) -> str | None:
    fmt, sep, path = str(v).partition(":")
    return None if sep and fmt in FORMATS and path else f"FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"


def _loop_rules(checkpoint_every: bool = True) -> dict[str, Rule]:
    """The training loop's keys, shared by every training section (train/loop.py)."""
    return {
        # AdamW learning rates in use are 1e-6 .. 1e-2; above 1 every step overshoots
        "max_steps": Int(1), "lr": Float(0.0, 1.0, lo_open=True), "min_lr_ratio": Frac(), "warmup_steps": Int(0),
        "schedule": Choice("cosine", "wsd", "constant"), "decay_fraction": Frac(),
        "weight_decay": Float(0.0, 10.0), "beta1": Frac(hi_open=True), "beta2": Frac(hi_open=True),
        "grad_clip": Float(0.0, 1e4), "precision": Choice("auto", "fp32", "bf16"), "init_from": Any_(),
        # how it runs and what it reports, not what it computes: operational. (fsdp is not: its
        # optimizer state is saved by parameter name, DDP's by index, so a run cannot switch midway.)
        "compile": Any_(operational=True), "fsdp": Any_(),
        "checkpoint_every": Int(0, operational=True), "keep_last": Int(1, operational=True),
        "eval_every": Int(0, operational=True), "log_every": Int(1, operational=True),
        "tensorboard": Any_(operational=True), "ema_decay": Frac(hi_open=True, added_at=0.0),
        "optimizer": Choice("adamw", "muon", added_at="adamw"),
    }


_LEN = _num(1, integer=True)
NEGATIVES = ("sample", "other", "cut", "repeat", "refusal", "empty")   # the rejected answers rm.negatives may name
RULES: dict[str, dict[str, Rule]] = {
    # the preset names which keys a run starts from (resolve loads it under config.toml): never a name it lacks
    "run": {"preset": Rule(lambda v: None if v in preset_names() else "one of " + ", ".join(preset_names()),
                           operational=True),
            "seed": Int(0), "device": Rule(_device, operational=True)},
    "data": {
        "sources": Each(_source, "FORMAT:PATH strings"), "val_fraction": Frac(hi_open=True),
        "builtin_parts": Each(lambda v: None if v in ("peoples-daily", "reviews", "idioms") else "",
                              "'peoples-daily', 'reviews', 'idioms'", nonempty=True),
        "idioms": Int(0, added_at=0), "idiom_texts": Int(1, 5, added_at=1),
        "text_field": Rule(lambda v: None if v else "a non-empty field name"),
        "text_unit": Choice("line", "block"), "max_record_bytes": Int(1),
        "workers": Int(0, operational=True),
        "executor": Choice("local", "ray", operational=True, added_at="local"),
        "ray_address": Any_(operational=True, added_at=""), "shard_docs": Int(1), "drop_samples": Int(0, operational=True),
        "nfkc": Any_(), "t2s": Any_(), "remove_citations": Any_(), "collapse_punct": Any_(), "mask_pii": Any_(),
        "min_chars": Int(0), "min_cjk_chars": Int(0), "min_cjk_ratio": Frac(), "min_line_punct_ratio": Frac(),
        "max_dup_line_frac": Frac(),
        "top_ngram_n": Each(_LEN, "integers >= 1"), "top_ngram_max": Each(_num(0, 1), "numbers in [0, 1]"),
        "dup_ngram_n": Each(_LEN, "integers >= 1"), "dup_ngram_max": Each(_num(0, 1), "numbers in [0, 1]"),
        "drop_section_titles": Any_(), "exact_dedup": Any_(), "near_dedup": Any_(),
        "near_threshold": Frac(lo_open=True), "shingle_chars": Int(1), "minhash_perm": Int(1), "lsh_bands": Int(0),
        "minhash_seed": Int(0),
    },
    "tokenizer": {
        "vocab_size": Int(257), "train_chars": Int(1), "max_doc_chars": Int(1), "reserved_tokens": Int(0),
        "pattern": Any_(), "default_system_prompt": Any_(), "num_threads": Int(0, operational=True),
    },
    "model": {
        "hidden_size": Int(2), "intermediate_size": Int(1), "num_hidden_layers": Int(1),
        "num_attention_heads": Int(1), "num_key_value_heads": Int(0), "max_position_embeddings": Int(2),
        "rope_theta": Float(0.0, 1e9, lo_open=True), "rms_norm_eps": Float(0.0, 0.1, lo_open=True),
        "tie_word_embeddings": Any_(), "initializer_range": Float(0.0, 1.0, lo_open=True),
    },
    "pretrain": {
        **_loop_rules(), "seq_len": Int(1), "batch_tokens": Int(1), "micro_batch_size": Int(1),
        "eval_tokens": Int(0, operational=True), "samples": Int(0, operational=True),
        "sample_tokens": Int(1, operational=True),
    },
    "sft": {
        **_loop_rules(), "sources": Each(_source, "FORMAT:PATH strings"), "eval_fraction": Frac(hi_open=True),
        "rl_fraction": Frac(hi_open=True), "val_fraction": Frac(hi_open=True), "multi_turn_fraction": Frac(),
        "identity_fraction": Frac(hi_open=True), "min_prompt_chars": Int(0), "max_prompt_chars": Int(1),
        "dedup_threshold": Frac(lo_open=True), "max_seq_len": Int(8), "max_train_samples": Int(0),
        "val_samples": Int(0, operational=True), "batch_tokens": Int(1), "micro_batch_tokens": Int(8),
        "unlikelihood": Float(0.0, 100.0), "extra_idioms": Int(-1, added_at=0),
    },
    "eval": {
        "num_prompts": Int(1), "max_new_tokens": Int(1), "batch_size": Int(1, operational=True),
        "repetition_penalty": Float(0.0, 10.0, lo_open=True), "num_samples": Int(0),
        "val_samples": Int(0), "gold_fraction": Frac(hi_open=True), "bootstrap": Int(0),
    },
    "chat": {
        "temperature": Float(0.0, 10.0), "top_k": Int(0), "top_p": Frac(lo_open=True),
        "repetition_penalty": Float(0.0, 10.0, lo_open=True),
    },
    "rl": {
        "temperature": Float(0.0, 10.0, lo_open=True), "max_new_tokens": Int(1), "gold_prompts": Int(1),
        "gold_max_new_tokens": Int(1), "seed": Int(0, added_at=0),
    },
    "rm": {
        # the reward model reads pairs: any other reader's records have no chosen / rejected
        **_loop_rules(), "sources": Each(lambda v: _source(v) or (None if str(v).startswith("preference:") else ""),
                                         "preference:PATH strings"), "prompts": Int(0),
        "negatives": Each(lambda v: None if v in NEGATIVES else "", ", ".join(NEGATIVES), nonempty=True),
        "val_fraction": Frac(lo_open=True, hi_open=True), "gold_samples": Int(2), "max_seq_len": Int(16),
        "batch_pairs": Int(1), "micro_batch_pairs": Int(1),
    },
    "dpo": {
        **_loop_rules(), "beta": Float(0.0, 100.0, lo_open=True), "sft_loss": Float(0.0, 100.0), "max_seq_len": Int(16),
        "batch_pairs": Int(1), "micro_batch_pairs": Int(1), "eval_every": Int(0),
    },
    "ppo": {
        **_loop_rules(), "eval_every": Int(0), "prompts_per_rollout": Int(1), "epochs": Int(1), "minibatches": Int(1),
        "gen_batch_size": Int(1, operational=True), "kl_coef": Float(0.0, 100.0), "kl_target": Float(0.0, 1e4),
        "kl_horizon": Int(1), "kl_budget": Float(0.0, 1e6), "missing_eos_penalty": Float(0.0, 100.0),
        "loop_penalty": Float(0.0, 100.0, added_at=0.0), "gamma": Frac(),
        "lam": Frac(), "clip": Float(0.0, 10.0, lo_open=True), "value_clip": Float(0.0, 1e3, lo_open=True),
        "vf_coef": Float(0.0, 100.0), "critic_lr": Float(0.0, 1.0, lo_open=True), "ptx_coef": Float(0.0, 100.0),
        "ptx_rows": Int(1),
    },
    "grpo": {
        **_loop_rules(), "eval_every": Int(0), "prompts_per_rollout": Int(1), "samples_per_prompt": Int(2),
        "reward": Choice("rm", "rules", "rm+rules", "reference", "rm+reference", "rules+reference", "rm+rules+reference"), "rules_weight": Float(0.0, 100.0, lo_open=True),
        "scale_rewards": Choice("group", "batch", "none", added_at="group"), "epochs": Int(1),
        "minibatches": Int(1), "gen_batch_size": Int(1, operational=True), "kl_coef": Float(0.0, 100.0),
        "kl_budget": Float(0.0, 1e6), "missing_eos_penalty": Float(0.0, 100.0),
        "loop_penalty": Float(0.0, 100.0, added_at=0.0), "clip": Float(0.0, 10.0, lo_open=True),
        "ptx_coef": Float(0.0, 100.0, added_at=0.0), "ptx_rows": Int(1, added_at=16),
    },
}


def _relations(cfg: dict) -> list[tuple[str, str]]:
    """(keys, what is wrong) for every relation between keys that does not hold."""
    out = []
    m, p, s, d, t = cfg["model"], cfg["pretrain"], cfg["sft"], cfg["data"], cfg["tokenizer"]
    heads, kv = m["num_attention_heads"], m["num_key_value_heads"] or m["num_attention_heads"]
    if m["hidden_size"] % heads:
        out.append(("model.hidden_size", f"{m['hidden_size']} is not divisible by model.num_attention_heads = {heads}"))
    elif (m["hidden_size"] // heads) % 2:
        out.append(("model.hidden_size", f"gives an odd head size {m['hidden_size'] // heads} (hidden_size / "
                                         f"num_attention_heads); RoPE rotates pairs, so it must be even"))
    if heads % kv:
        out.append(("model.num_key_value_heads", f"{kv} does not divide model.num_attention_heads = {heads}"))
    if p["seq_len"] > m["max_position_embeddings"]:
        out.append(("pretrain.seq_len", f"{p['seq_len']} > model.max_position_embeddings = "
                                        f"{m['max_position_embeddings']}"))
    per_pass = p["micro_batch_size"] * p["seq_len"]     # x the processes, checked when pretraining starts
    if p["batch_tokens"] % per_pass:
        out.append(("pretrain.batch_tokens", f"{p['batch_tokens']} is not a multiple of micro_batch_size x seq_len "
                                             f"= {per_pass}"))
    if s["eval_fraction"] + s["rl_fraction"] + s["val_fraction"] >= 1:
        out.append(("sft.eval_fraction", "eval_fraction + rl_fraction + val_fraction must leave a share for "
                                         f"training (they sum to {s['eval_fraction'] + s['rl_fraction'] + s['val_fraction']:g})"))
    if s["min_prompt_chars"] > s["max_prompt_chars"]:
        out.append(("sft.min_prompt_chars", f"{s['min_prompt_chars']} > sft.max_prompt_chars = {s['max_prompt_chars']}"))
    for n, mx in (("top_ngram_n", "top_ngram_max"), ("dup_ngram_n", "dup_ngram_max")):
        if len(d[n]) != len(d[mx]):
            out.append((f"data.{n}", f"has {len(d[n])} sizes but data.{mx} has {len(d[mx])} limits; give one per size"))
    if d["lsh_bands"] and d["minhash_perm"] % d["lsh_bands"]:
        out.append(("data.lsh_bands", f"{d['lsh_bands']} does not divide data.minhash_perm = {d['minhash_perm']}"))
    specials = 4 + t["reserved_tokens"]
    if t["vocab_size"] < 256 + specials + 1:
        out.append(("tokenizer.vocab_size", f"{t['vocab_size']} leaves no merge to learn: it needs 256 byte tokens + "
                                            f"{specials} special tokens + at least one merge"))
    for sec in ("ppo", "grpo"):
        rollout = cfg[sec]["prompts_per_rollout"] * cfg[sec].get("samples_per_prompt", 1)
        if cfg[sec]["minibatches"] > rollout:
            out.append((f"{sec}.minibatches", f"{cfg[sec]['minibatches']} > the {rollout} answers of a rollout"))
    for sec in ("pretrain", "sft"):
        if cfg[sec]["warmup_steps"] > cfg[sec]["max_steps"]:
            out.append((f"{sec}.warmup_steps", f"{cfg[sec]['warmup_steps']} > {sec}.max_steps = {cfg[sec]['max_steps']}"))
    return out


def validate(cfg: dict) -> dict:
    """Check every value against RULES and the relations between them; one-line UserError on the first problem."""
    for section, rules in RULES.items():
        for key, rule in rules.items():
            v = cfg[section][key]
            problem = rule.check(v)
            if problem is not None:
                raise UserError(f"config key '{section}.{key}' = {_toml_value(v)}: must be {problem}; set it with "
                                f"--set {section}.{key}=VALUE")
    for key, problem in _relations(cfg):
        raise UserError(f"config key '{key}' {problem}; change it with --set {key}=...")
    return cfg


def result_items(cfg: dict, sections) -> dict:
    """{"section.key": value} of the keys that change a stage's result (not the operational ones)."""
    return {f"{s}.{k}": v for s in sections for k, v in cfg[s].items()
            if not RULES[s][k].operational and not (RULES[s][k].added_at is not None and v == RULES[s][k].added_at)}


# ---------------------------------------------------------------- merging, presets, overrides

def _type_name(v) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(v), type(v).__name__)


def _check_type(section: str, key: str, value, default):
    """Return value coerced to the default's type, or raise a one-line UserError."""
    where = f"{section}.{key}"
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif type(value) is type(default):
        return value
    raise UserError(f"config key '{where}' must be {_type_name(default)}, got {_type_name(value)} {value!r}")


def merge(base: dict, override: dict, schema: dict, origin: str) -> dict:
    """Deep-merge `override` into a copy of `base`, checking every key and type against `schema`."""
    out = copy.deepcopy(base)
    for section, values in override.items():
        if section not in schema or not isinstance(values, dict):
            raise UserError(f"{origin}: unknown config section '{section}'; valid sections: {', '.join(schema)}")
        for key, value in values.items():
            if key not in schema[section]:
                raise UserError(f"{origin}: unknown config key '{section}.{key}'; valid keys in [{section}]: "
                                f"{', '.join(schema[section])}")
            out[section][key] = _check_type(section, key, value, schema[section][key])
    return out


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{name}.toml"
    if name == "defaults" or not path.exists():
        raise UserError(f"unknown preset '{name}'; valid presets: {', '.join(preset_names())}")
    schema = defaults()
    raw = _read_toml(path)
    parent = raw.pop("inherit", None)
    base = load_preset(parent) if parent else schema
    cfg = merge(base, raw, schema, f"preset {name}")
    cfg["run"]["preset"] = name
    return cfg


def parse_override(item: str) -> tuple[str, str, object]:
    """`section.key=value`; the value is read as a TOML literal, else taken as a string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set pretrain.lr=3e-4")
    lhs, raw = item.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def apply_overrides(cfg: dict, items: list[str]) -> dict:
    override: dict = {}
    for item in items or []:
        section, key, value = parse_override(item)
        override.setdefault(section, {})[key] = value
    return merge(cfg, override, defaults(), "--set")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(cfg: dict) -> str:
    lines = ["# The resolved configuration of this run (preset + overrides + sources). Later commands on this",
             "# run directory start from it; change it with --set section.key=value.", ""]
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _read_saved(path: Path) -> dict:
    """A run's config.toml, refused when it cannot be what `save` wrote: an empty file (a write cut short,
    or cleared by hand) would otherwise mean the demo preset's defaults, silently, for a run that may
    have been started from another preset with other keys; an unknown preset has no keys to start from."""
    data = _read_toml(path)
    if not data:
        raise UserError(f"{path} is empty (no [section] keys): a run's config.toml holds its preset and every --set, "
                        f"and an empty one would silently mean the demo defaults. Put the run's settings back (e.g. "
                        f"'[run]' and 'preset = \"{DEFAULT_PRESET}\"'), or remove the empty file and name the preset "
                        f"again with --preset NAME ({', '.join(preset_names())})")
    name = data.get("run", {}).get("preset", DEFAULT_PRESET) if isinstance(data.get("run"), dict) else DEFAULT_PRESET
    if not isinstance(name, str) or name not in preset_names():
        raise UserError(f"{path}: [run] preset = {name!r} is not a preset of this version; set it to one of "
                        f"{', '.join(preset_names())} (the one this run was started from)")
    return data


def saved_preset(run_dir: Path) -> str | None:
    """The preset an existing run directory was started from, or None for a new one."""
    saved = Path(run_dir) / CONFIG_FILE
    if not saved.exists():
        return None
    return str(_read_saved(saved).get("run", {}).get("preset", DEFAULT_PRESET))


def resolve(run_dir: Path, preset: str | None, overrides: list[str], sources: dict[str, list[str]] | None = None) -> dict:
    """The validated config for a command on `run_dir` (nothing is written; see `save`).

    An existing run starts from its config.toml, a new one from `preset` (default demo); then
    `overrides` (--set) and `sources` ({section: specs}, from --source) apply on top. A key the saved
    config lacks comes from its preset, except a key added to zero-chatgpt after the run was made
    (Rule.added_at): that one keeps the value that gives the behaviour the run was made with, so a
    preset that changed since (the demo's idiom world) never makes a finished run out of date.
    """
    saved = Path(run_dir) / CONFIG_FILE
    if saved.exists():
        data = _read_saved(saved)
        name = str(data.get("run", {}).get("preset", DEFAULT_PRESET))
        if preset and preset != name:
            raise UserError(f"{run_dir} is a run of preset '{name}': --preset {preset} would replace its config. "
                            f"Use another --run-dir (the default for this preset is runs/{preset}), or leave out "
                            f"--preset to continue this run")
        cfg = merge(load_preset(name), data, defaults(), str(saved))
        for section, rules in RULES.items():
            for key, rule in rules.items():
                if rule.added_at is not None and key not in (data.get(section) or {}) and key in cfg.get(section, {}):
                    cfg[section][key] = rule.added_at
    else:
        cfg = load_preset(preset or DEFAULT_PRESET)
    cfg = apply_overrides(cfg, overrides)
    for section, specs in (sources or {}).items():
        cfg[section]["sources"] = list(specs)
    return validate(cfg)


def save(run_dir: Path, cfg: dict) -> None:
    """Write cfg to RUN_DIR/config.toml (atomically), if it differs from what is there."""
    path = Path(run_dir) / CONFIG_FILE
    text = dumps(cfg)
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, ValueError):       # absent, unreadable or not UTF-8: written anew below
        pass
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
