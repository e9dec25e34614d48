"""Configuration: TOML presets, `--set section.key=value` overrides, validation.

The schema is `core/settings.py` (with `core/train_settings.py`): one typed section per
[section], each key with its default, what it does, what it allows and whether it is operational
(`presets/defaults.toml` is written from it). A preset (`presets/demo.toml`, ...) overrides a
subset; every command receives a validated `settings.Config`.

A run directory keeps the resolved config of its run in RUN_DIR/config.toml (the preset,
every `--set` given so far and the `--source`s), and later commands on it start from that
file: a `--source` or `--set` is given once, not at every command. `--preset` names how a
*new* run starts; naming another preset for an existing run is refused rather than
replacing its config (and, through the stage keys, its trained work).

Every value is checked against its key's rule, and the relations between keys below, before
anything runs. Keys that only change how a result is computed or reported (logging, eval and
checkpoint intervals, worker and thread counts, the device) are *operational*: they never enter a
stage key, so changing them never makes a finished stage look out of date.
"""
from __future__ import annotations

import copy
from pathlib import Path

import tomllib

from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_text
from zero_chatgpt.core.schema import PRESET_DIR, Rule, preset_names, rule_of, toml_value
from zero_chatgpt.core.settings import BY_NAME, SECTIONS, Config, default_dict
from zero_chatgpt.core.train_settings import TrainingSection

CONFIG_FILE = "config.toml"
DEFAULT_PRESET = "demo"


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
    """{section: {key: default}} from the schema: what presets and --set are checked and merged against."""
    return default_dict()


RULES: dict[str, dict[str, Rule]] = {sec.NAME: {f.name: rule_of(f) for f in sec.keys()} for sec in SECTIONS}


def _relations(cfg: Config) -> list[tuple[str, str]]:
    """(keys, what is wrong) for every relation between keys that does not hold."""
    out = []
    m, p, s, d, t = cfg.model, cfg.pretrain, cfg.sft, cfg.data, cfg.tokenizer
    heads, kv = m.num_attention_heads, m.num_key_value_heads or m.num_attention_heads
    if m.hidden_size % heads:
        out.append(("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_attention_heads = {heads}"))
    elif (m.hidden_size // heads) % 2:
        out.append(("model.hidden_size", f"gives an odd head size {m.hidden_size // heads} (hidden_size / "
                                         f"num_attention_heads); RoPE rotates pairs, so it must be even"))
    if heads % kv:
        out.append(("model.num_key_value_heads", f"{kv} does not divide model.num_attention_heads = {heads}"))
    if p.seq_len > m.max_position_embeddings:
        out.append(("pretrain.seq_len", f"{p.seq_len} > model.max_position_embeddings = {m.max_position_embeddings}"))
    per_pass = p.micro_batch_size * p.seq_len     # x the processes, checked when pretraining starts
    if p.batch_tokens % per_pass:
        out.append(("pretrain.batch_tokens", f"{p.batch_tokens} is not a multiple of micro_batch_size x seq_len "
                                             f"= {per_pass}"))
    if s.eval_fraction + s.rl_fraction + s.val_fraction >= 1:
        out.append(("sft.eval_fraction", "eval_fraction + rl_fraction + val_fraction must leave a share for "
                                         f"training (they sum to {s.eval_fraction + s.rl_fraction + s.val_fraction:g})"))
    if s.min_prompt_chars > s.max_prompt_chars:
        out.append(("sft.min_prompt_chars", f"{s.min_prompt_chars} > sft.max_prompt_chars = {s.max_prompt_chars}"))
    for n, mx in (("top_ngram_n", "top_ngram_max"), ("dup_ngram_n", "dup_ngram_max")):
        if len(getattr(d, n)) != len(getattr(d, mx)):
            out.append((f"data.{n}", f"has {len(getattr(d, n))} sizes but data.{mx} has {len(getattr(d, mx))} "
                                     f"limits; give one per size"))
    if d.lsh_bands and d.minhash_perm % d.lsh_bands:
        out.append(("data.lsh_bands", f"{d.lsh_bands} does not divide data.minhash_perm = {d.minhash_perm}"))
    specials = 4 + t.reserved_tokens
    if t.vocab_size < 256 + specials + 1:
        out.append(("tokenizer.vocab_size", f"{t.vocab_size} leaves no merge to learn: it needs 256 byte tokens + "
                                            f"{specials} special tokens + at least one merge"))
    for sec in (cfg.ppo, cfg.grpo):
        rollout = sec.prompts_per_rollout * getattr(sec, "samples_per_prompt", 1)
        if sec.minibatches > rollout:
            out.append((f"{sec.NAME}.minibatches", f"{sec.minibatches} > the {rollout} answers of a rollout"))
    for sec in (cfg.pretrain, cfg.sft):
        if sec.warmup_steps > sec.max_steps:
            out.append((f"{sec.NAME}.warmup_steps", f"{sec.warmup_steps} > {sec.NAME}.max_steps = {sec.max_steps}"))
    for sec in (cfg.section(s.NAME) for s in SECTIONS if issubclass(s, TrainingSection)):
        # Muon orthogonalizes whole matrices and an average of sharded weights would be sharded: DDP only
        if sec.fsdp and sec.optimizer == "muon":
            out.append((f"{sec.NAME}.fsdp", "with optimizer = muon: Muon orthogonalizes whole matrices, FSDP shards "
                                            f"them; use DDP ({sec.NAME}.fsdp=false) or {sec.NAME}.optimizer=adamw"))
        if sec.fsdp and sec.ema_decay:
            out.append((f"{sec.NAME}.fsdp", f"with ema_decay: the average would be sharded like the weights; use DDP "
                                            f"({sec.NAME}.fsdp=false)"))
    return out


def validate(cfg: Config) -> Config:
    """Check every value against its key's rule and the relations between keys; one-line UserError on the
    first problem, naming the key, what it allows and what it does."""
    for sec in SECTIONS:
        for f in sec.keys():
            v = getattr(cfg.section(sec.NAME), f.name)
            problem = rule_of(f).check(v)
            if problem is not None:
                raise UserError(f"config key '{sec.NAME}.{f.name}' = {toml_value(v)}: must be {problem}; set it with "
                                f"--set {sec.NAME}.{f.name}=VALUE (the key: {f.metadata['help']})")
    for key, problem in _relations(cfg):
        raise UserError(f"config key '{key}' {problem}; change it with --set {key}=...")
    return cfg


def result_items(cfg: Config, sections) -> dict:
    """{"section.key": value} of the keys that change a stage's result (not the operational ones)."""
    out = {}
    for s in sections:
        for f in BY_NAME[s].keys():
            r, v = rule_of(f), getattr(cfg.section(s), f.name)
            if not r.operational and not (r.added_at is not None and v == r.added_at):
                out[f"{s}.{f.name}"] = v
    return out


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


def _preset_values(name: str) -> dict:
    """{section: {key: value}} of a preset: the schema's defaults, its parent's (`inherit`), then its own."""
    path = PRESET_DIR / f"{name}.toml"
    if name == "defaults" or not path.exists():
        raise UserError(f"unknown preset '{name}'; valid presets: {', '.join(preset_names())}")
    schema = defaults()
    raw = _read_toml(path)
    parent = raw.pop("inherit", None)
    base = _preset_values(parent) if parent else schema
    cfg = merge(base, raw, schema, f"preset {name}")
    cfg["run"]["preset"] = name
    return cfg


def load_preset(name: str) -> Config:
    """A preset's configuration (not yet validated: see `validate`)."""
    return Config.from_dict(_preset_values(name))


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


def _overridden(values: dict, items: list[str]) -> dict:
    override: dict = {}
    for item in items or []:
        section, key, value = parse_override(item)
        override.setdefault(section, {})[key] = value
    return merge(values, override, defaults(), "--set")


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    """`cfg` with `--set section.key=value` items applied (a new object; not yet validated)."""
    return Config.from_dict(_overridden(cfg.to_dict(), items))


def dumps(cfg: Config) -> str:
    lines = ["# The resolved configuration of this run (preset + overrides + sources). Later commands on this",
             "# run directory start from it; change it with --set section.key=value.", ""]
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
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


def saved_config(run_dir: Path) -> Config:
    """What a run directory's config.toml holds, over the defaults (the defaults alone where it has none);
    for reading a finished run's settings, not for starting a command (see `resolve`)."""
    path = Path(run_dir) / CONFIG_FILE
    values = defaults()
    if path.exists():
        values = merge(values, _read_toml(path), defaults(), str(path))
    return Config.from_dict(values)


def resolve(run_dir: Path, preset: str | None, overrides: list[str],
            sources: dict[str, list[str]] | None = None) -> Config:
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
        cfg = merge(_preset_values(name), data, defaults(), str(saved))
        for section, rules in RULES.items():
            for key, rule in rules.items():
                if rule.added_at is not None and key not in (data.get(section) or {}) and key in cfg.get(section, {}):
                    cfg[section][key] = rule.added_at
    else:
        cfg = _preset_values(preset or DEFAULT_PRESET)
    cfg = _overridden(cfg, overrides)
    for section, specs in (sources or {}).items():
        cfg[section]["sources"] = list(specs)
    return validate(Config.from_dict(cfg))


def save(run_dir: Path, cfg: Config) -> None:
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
