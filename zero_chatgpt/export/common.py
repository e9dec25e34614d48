"""What both export formats share: the marker that records what an export wrote (so an export replaces
only its own earlier output, never a file of the user's), and the sampling defaults both record."""
from __future__ import annotations

from pathlib import Path

from zero_chatgpt.core import manifest
from zero_chatgpt.core.settings import ChatSection

EXPORT_MARKER = ".zero-chatgpt-export.json"   # what an export wrote: names, sizes, hashes


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "zero_chatgpt.json")


def file_marker(out: Path) -> str:
    """The marker of a one-file export (gguf), beside it: the file cannot hold its own hash."""
    return f".{out.name}{EXPORT_MARKER}"


def replaceable(out: Path, file: bool = False) -> str | None:
    """None if `out` may be replaced by an export: absent, an empty folder, or a folder holding exactly
    what an earlier export wrote there (its marker lists every file, unchanged); with file=True, a file
    an earlier export wrote (the marker beside it lists it, unchanged). Else why not."""
    if not out.exists():
        # under a regular file nothing can be made (exists() says False there): say which file is in the way
        blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            return (f"{blocker} is a file, so {out} cannot be made under it; nothing was changed: choose an --out "
                    f"that is not under a file")
        return None
    if file:
        if out.is_dir():
            return f"{out} is a folder; --format gguf writes one file: give --out a file path, e.g. {out / 'model.gguf'}"
        m = manifest.read(out.parent, file_marker(out))
        if m is None or list(m.get("files") or {}) != [out.name]:
            return (f"{out} exists and was not written by `zero-chatgpt export`; nothing was changed: choose a new "
                    f"--out file (or remove that one yourself)")
        changed = manifest.problem(out.parent, name=file_marker(out))
        if changed:
            return (f"{out} was written by `zero-chatgpt export` but changed since ({changed}); nothing was changed: "
                    f"choose a new --out file (or remove that one yourself)")
        return None
    if not out.is_dir():
        return f"{out} is a file, not a folder; give --out a new or empty folder"
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if not present and not any(out.iterdir()):
        return None
    m = manifest.read(out, EXPORT_MARKER)
    if m is None:
        return (f"{out} is not empty and was not written by `zero-chatgpt export` (it holds "
                f"{', '.join(present[:4])}{' ...' if len(present) > 4 else ''}); nothing was changed: choose a new "
                f"or empty --out folder")
    foreign = [p for p in present if p != EXPORT_MARKER and p not in m["files"]]
    changed = manifest.problem(out, name=EXPORT_MARKER)
    if foreign or changed:
        what = f"files export did not write: {', '.join(foreign[:4])}" if foreign else f"a file changed since: {changed}"
        return f"{out} holds an earlier export plus {what}; nothing was changed: choose a new or empty --out folder"
    return None


def generation_settings(sampling: ChatSection | None) -> dict:
    """`zero-chatgpt chat`'s sampling (the run's [chat] section, else its defaults), which both formats record
    as the model's own defaults (generation_config.json; GGUF's general.sampling.* keys)."""
    return (sampling or ChatSection()).values()
