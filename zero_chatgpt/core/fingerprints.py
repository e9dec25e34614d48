"""Content fingerprints of a stage's external inputs (corpora, instruction files, starting weights): names, sizes
and content hashes, cached by file identity so an unchanged corpus is hashed once."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from zero_chatgpt.core import manifest
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.data.sources import parse_source, source_files

FINGERPRINTS = ".fingerprints.json"


def fingerprint_files(files: list[tuple[str, Path]], cache_dir: Path | None) -> str:
    """One hash over (name, size, content hash) of each file; names are relative, so moving a
    corpus does not change it, and touching a file (a new mtime) does not either.

    Content hashes are cached by (path, size, mtime, inode) in cache_dir/.fingerprints.json,
    so an unchanged multi-GB corpus is hashed once, not at every command (git's index does the same)."""
    cache_path = Path(cache_dir) / FINGERPRINTS if cache_dir else None
    cache: dict = {}
    if cache_path is not None:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    h = hashlib.sha256()
    changed = False
    for name, path in sorted(files, key=lambda x: x[0]):
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = cache.get(ident)
        if digest is None:
            digest = manifest.file_hash(path)
            cache[ident] = digest
            changed = True
        h.update(f"{name}\0{st.st_size}\0{digest}\n".encode())
    if changed and cache_path is not None and cache_path.parent.is_dir():
        try:
            atomic_write_json(cache_path, cache)
        except OSError:
            pass    # a cache only
    return h.hexdigest()[:32]


def source_fingerprints(specs: list[str], cache_dir: Path | None) -> list[str]:
    """`FORMAT:<content fingerprint>` per `FORMAT:PATH` source (what the reader would read)."""
    out = []
    for spec in specs:
        src = parse_source(spec)
        files = source_files(src)
        base = src.path if src.path.is_dir() else src.path.parent
        out.append(f"{src.fmt}:{fingerprint_files([(str(p.relative_to(base)), p) for p in files], cache_dir)}")
    return out


def folder_fingerprint(folder: Path, cache_dir: Path | None) -> str:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected a model checkpoint or an HF Llama folder)")
    files = [(p.name, p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return fingerprint_files(files, cache_dir)
