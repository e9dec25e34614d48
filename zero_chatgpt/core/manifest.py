"""Manifests: what a folder of outputs holds, written last, checked before use.

A checkpoint (or an export) is complete only if its `manifest.json` exists and every file it
lists has the listed size and xxh3-128 hash. The manifest is written after every other file
and fsync'ed with them, so a save cut by a kill, a full disk or a bad sector shows up as a
missing or failing manifest, never as a half-read tensor file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import xxhash

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe(folder: Path, names) -> dict:
    """{name: {"size", "xxh3_128"}} of the named files in `folder`."""
    return {n: {"size": (folder / n).stat().st_size, "xxh3_128": file_hash(folder / n)} for n in sorted(names)}


def write(folder: Path, files: dict, extra: dict | None = None, name: str = MANIFEST) -> None:
    """Write folder/manifest.json (or `name`) listing `files` (from `describe`), fsync'ed."""
    path = Path(folder) / name
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"files": files, **(extra or {})}, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def read(folder: Path, name: str = MANIFEST) -> dict | None:
    try:
        return json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def problem(folder: Path, hashes: bool = True, name: str = MANIFEST) -> str | None:
    """None if `folder` is complete and intact, else what is wrong with it (for a message)."""
    folder = Path(folder)
    m = read(folder, name)
    if m is None or not isinstance(m.get("files"), dict):
        return f"no {name} (the save did not finish)"
    for name, want in m["files"].items():
        p = folder / name
        try:
            size = p.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != want.get("size"):
            return f"{name} has {size:,} bytes, {want.get('size'):,} were written"
        if hashes and file_hash(p) != want.get("xxh3_128"):
            return f"{name} is damaged (its hash differs from the one written)"
    return None
