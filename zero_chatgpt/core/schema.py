"""How a config key is declared and checked: its rule (the values it allows, whether it is operational, the
value that means "as before it existed"), the key() and again() fields of a section, the Section base, and
how a value is written in TOML. The sections themselves are in core/settings.py and core/train_settings.py."""
from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from zero_chatgpt.data.sources import FORMATS

PRESET_DIR = Path(__file__).parents[1] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p.stem != "defaults")


@dataclass(frozen=True)
class Rule:
    """What a key allows. `check(value)` returns None when fine, else what is allowed."""
    check: Callable[[Any], str | None]
    operational: bool = False       # True: never part of a stage key (see the module docstring)
    added_at: Any = None            # the value that means "as before this key existed" (module docstring)


def number(lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> Callable[[Any], str | None]:
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
    return Rule(number(lo, hi, integer=True), **kw)


def Float(lo, hi, lo_open=False, hi_open=False, **kw) -> Rule:
    """A float key in [lo, hi] (open ends with lo_open / hi_open). Both bounds are required: a value far
    beyond any sensible one (lr = 1e308) is a typo, and it is better refused now than found as a NaN
    loss hours later. The upper bounds are generous, one or more orders above any value in use."""
    return Rule(number(lo, hi, lo_open, hi_open), **kw)


def Frac(lo_open=False, hi_open=False, **kw) -> Rule:
    return Float(0.0, 1.0, lo_open, hi_open, **kw)


def Choice(*allowed, **kw) -> Rule:
    return Rule(lambda v: None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed), **kw)


def Free(**kw) -> Rule:
    """Any value of the key's type."""
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


def device_name(v: str) -> str | None:
    # "cuda" means each process's own GPU (LOCAL_RANK under torchrun); pick GPUs with CUDA_VISIBLE_DEVICES
    return None if v in ("auto", "cpu", "cuda") else "'auto', 'cpu' or 'cuda' (choose GPUs with CUDA_VISIBLE_DEVICES)"


def source_spec(v) -> str | None:
    fmt, sep, path = str(v).partition(":")
    return None if sep and fmt in FORMATS and path else f"FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"


def preference_source(v) -> str | None:
    # the reward model reads pairs: any other reader's records have no chosen / rejected
    return source_spec(v) or (None if str(v).startswith("preference:") else "")


def preset_name(v) -> str | None:
    # the preset names which keys a run starts from (config.resolve loads it under config.toml)
    return None if v in preset_names() else "one of " + ", ".join(preset_names())


POSITIVE_INT = number(1, integer=True)


FRACTION = number(0, 1)


BUILTIN_PARTS = ("peoples-daily", "reviews", "idioms")


NEGATIVES = ("sample", "other", "cut", "repeat", "refusal", "empty")   # the rejected answers rm.negatives may name


GRPO_REWARDS = ("rm", "rules", "rm+rules", "reference", "rm+reference", "rules+reference", "rm+rules+reference")


def key(default, help: str, rule: Rule | None = None) -> Any:
    """A config key: its default, what it does and why (`help`), and what it allows (`rule`)."""
    meta = {"help": help, "rule": rule or Free()}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def again(default, help: str | None = None, rule: Rule | None = None) -> Any:
    """An inherited key with this section's default (and, where given, its own help or rule)."""
    return field(default=default, metadata={"again": True, "help": help, "rule": rule})


def section(cls):
    """@dataclass for a config section: an `again(...)` key takes what it leaves out from the base's key."""
    base = getattr(cls.__mro__[1], "__dataclass_fields__", {})      # the nearest base's keys, inherited ones too
    for name, value in list(vars(cls).items()):
        if isinstance(value, Field) and value.metadata.get("again"):
            old = base[name]
            meta = {"help": value.metadata["help"] or old.metadata["help"],
                    "rule": value.metadata["rule"] or old.metadata["rule"]}
            setattr(cls, name, field(default=value.default, metadata=meta))
    return dataclass(cls)


class Section:
    """A config section: typed keys, read as attributes (`cfg.sft.lr`)."""
    NAME: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> list[Field]:
        """The keys in the order defaults.toml shows them: the section's own first, then inherited ones."""
        out: list[Field] = []
        for c in cls.__mro__:
            parent = getattr(c.__mro__[1], "__dataclass_fields__", {}) if c is not object else {}
            out += [f for f in fields(cls) if f.name in getattr(c, "__dataclass_fields__", {}) and f.name not in parent]
        return out

    def values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.keys()}


def rule_of(f: Field) -> Rule:
    return f.metadata["rule"]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return lines + ([cur] if cur else [])


def help_text(f: Field) -> str:
    return ("(op) " if rule_of(f).operational else "") + f.metadata["help"]
