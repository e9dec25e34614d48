"""Configuration: TOML presets, `--set section.key=value` overrides, validation.

`presets/defaults.toml` holds every key with its default and a comment that says
what it does: it is the schema. A preset (`presets/demo.toml`, ...) overrides a
subset. The resolved config of a run is written to RUN_DIR/config.toml, and later
commands on that run directory start from it.
"""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from zero_chatgpt.console import UserError
from zero_chatgpt.io import atomic_write_text

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p.stem != "defaults")


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def defaults() -> dict:
    return _read_toml(PRESET_DIR / "defaults.toml")


def _type_name(v) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list"}.get(type(v), type(v).__name__)


def _check_value(section: str, key: str, value, default):
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
    """Deep-merge `override` into a copy of `base`, checking every key against `schema`."""
    out = copy.deepcopy(base)
    for section, values in override.items():
        if section not in schema or not isinstance(values, dict):
            raise UserError(f"{origin}: unknown config section '{section}'; valid sections: {', '.join(schema)}")
        for key, value in values.items():
            if key not in schema[section]:
                raise UserError(f"{origin}: unknown config key '{section}.{key}'; valid keys in [{section}]: "
                                f"{', '.join(schema[section])}")
            out[section][key] = _check_value(section, key, value, schema[section][key])
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
    lines = ["# The resolved configuration of this run (preset + overrides). Edit with --set.", ""]
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def resolve(run_dir: Path, preset: str | None, overrides: list[str]) -> dict:
    """The config for a command on `run_dir`, written back to run_dir/config.toml.

    An existing run directory keeps its config unless --preset is given again;
    --set changes apply on top either way.
    """
    saved = run_dir / "config.toml"
    if preset is None and saved.exists():
        cfg = merge(defaults(), _read_toml(saved), defaults(), str(saved))
    else:
        cfg = load_preset(preset or "demo")
    cfg = apply_overrides(cfg, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, dumps(cfg))
    return cfg
