"""Dedup across the data stage's parts, as tasks on its executor (a process pool here, or Ray).

The driver holds no index: it hands out tasks that read the parts' files and returns small
arrays, so the same code runs on one machine and on a Ray cluster (where the run directory is
on a file system every node sees, as the parts already are):

1. Exact, by hash partition: task p of P reads the exact hashes of every part, keeps those
   with `hash % P == p`, and returns each copy with the first document of its hash (the lowest
   id: parts are read in order).
2. Near, by band: a task takes a group of LSH bands, reads those columns of every part's band
   keys, and returns the candidate pairs of its buckets (dedup.candidate_pairs); all of a
   band's buckets meet in one task. The driver takes the union of the pairs.
3. Verification, a shuffle: the pairs (sorted by anchor) are cut into chunks; a task per part
   reads the part's documents once and writes, for each chunk, the texts that chunk needs
   (`work/verify/`); a task per chunk then computes the true shingle Jaccard of each of its
   pairs. Every candidate pair is verified (none is skipped because its two documents were
   already joined), so the result does not depend on how the pairs were cut or in which
   order tasks finished.
4. The driver unions the pairs at or above the threshold (dedup.UnionFind: the root is the
   cluster's lowest id) and keeps each cluster's root: the same documents as an in-memory
   `dedup.find_duplicates` over the whole corpus.

Every task writes atomically and is a pure function of the parts, so a task that Ray retries
after its worker died gives the same bytes.
"""
from __future__ import annotations

import json
import shutil
from concurrent.futures import Executor
from pathlib import Path

import numpy as np

from zero_chatgpt.core.io import atomic_write_json, iter_jsonl
from zero_chatgpt.core.settings import DataSection
from zero_chatgpt.core.workers import fault_point
from zero_chatgpt.data.dedup import ShingleJaccard, UnionFind, candidate_pairs

PAIRS_PER_CHUNK = 20_000    # candidate pairs per verification task: a few seconds of work


def _exact_partition(index_paths: list[str], offsets: np.ndarray, p: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """(copies, firsts): the documents of hash partition p that repeat an earlier one, and that one."""
    fault_point(f"exact-{p}")
    ids, hashes = [], []
    for k, path in enumerate(index_paths):
        with np.load(path) as z:
            e = z["exact"]
        sel = np.flatnonzero(e % np.uint64(parts) == np.uint64(p))
        ids.append(sel + offsets[k])
        hashes.append(e[sel])
    ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(ids_all) == 0:
        return ids_all, ids_all
    _, first, inverse = np.unique(np.concatenate(hashes), return_index=True, return_inverse=True)
    root = ids_all[first[inverse.reshape(-1)]]
    copy = root != ids_all
    return ids_all[copy], root[copy]


def _band_candidates(index_paths: list[str], alive: np.ndarray, bands: list[int]) -> np.ndarray:
    """Candidate pairs of the given bands' buckets among the `alive` documents (exact copies are out)."""
    fault_point(f"band-{bands[0]}")
    cols = []
    for path in index_paths:
        with np.load(path) as z:
            cols.append(z["keys"][:, bands])
    keys = np.concatenate(cols)
    ids = np.flatnonzero(alive)
    return candidate_pairs(keys[ids], ids)


def _gather_texts(docs_path: str, lo: int, wanted: dict[int, np.ndarray], out: dict[int, str]) -> int:
    """Write, for each chunk v, the texts of this part's documents that chunk `wanted` (global ids)."""
    fault_point(f"gather-{lo}")
    need = {}
    for v, ids in wanted.items():
        for g in ids.tolist():
            need.setdefault(g - lo, []).append(v)
    texts: dict[int, dict[str, str]] = {v: {} for v in wanted}
    for row, doc in enumerate(iter_jsonl(Path(docs_path))):
        for v in need.get(row, ()):
            texts[v][str(lo + row)] = doc["text"]
    for v, path in out.items():
        atomic_write_json(Path(path), texts[v])
    return sum(len(t) for t in texts.values())


def _verify_chunk(v: int, pairs: np.ndarray, text_files: list[str], ngram: int) -> np.ndarray:
    """The true shingle Jaccard of each pair of chunk v (float32), from the texts the gather tasks wrote."""
    fault_point(f"verify-{v}")
    texts: dict[int, str] = {}
    for path in text_files:
        texts.update((int(k), t) for k, t in json.loads(Path(path).read_text(encoding="utf-8")).items())
    sim = ShingleJaccard(texts.__getitem__, ngram)
    return np.fromiter((sim(i, j) for i, j in pairs.tolist()), dtype=np.float32, count=len(pairs))


def _groups(n: int, k: int) -> list[list[int]]:
    return [g.tolist() for g in np.array_split(np.arange(n), max(1, min(n, k))) if len(g)]


def deduplicate(cfg: DataSection, work: Path, index_paths: list[Path], docs_paths: list[Path], sizes: list[int],
                bands: int, pool: Executor, nworkers: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """keep mask over all cleaned documents (in part order), part offsets, and the summary for stats.json.

    index_paths, docs_paths, sizes: each part's band keys + exact hashes (.npz), documents, and
    document count; bands: the LSH bands of the keys; nworkers: how many tasks to cut the work in."""
    offsets = np.concatenate(([0], np.cumsum(np.asarray(sizes, dtype=np.int64)))).astype(np.int64)
    n = int(offsets[-1])
    index = [str(p) for p in index_paths]
    # the driver holds one byte per document (keep) and arrays the size of the duplicates, not of the corpus
    keep = np.ones(n, dtype=bool)
    copies = firsts = near_docs = near_roots = np.zeros(0, np.int64)
    summary = {"exact_dup": 0, "near_dup": 0, "candidate_pairs": 0, "verified_pairs": 0,
               "index_bytes_per_doc": 0.0, "largest_clusters": []}
    if cfg.exact_dedup and n:
        found = [f.result() for f in [pool.submit(_exact_partition, index, offsets, p, nworkers)
                                      for p in range(nworkers)]]
        copies = np.concatenate([c for c, _ in found])
        firsts = np.concatenate([f for _, f in found])
        keep[copies] = False
        summary["exact_dup"] = int(len(copies))
    if cfg.near_dedup and n > 1:
        summary["index_bytes_per_doc"] = float(8 * bands + 8)   # band keys + the exact hash, per document
        found = [f.result() for f in [pool.submit(_band_candidates, index, keep, g)
                                      for g in _groups(bands, nworkers)]]
        pairs = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
        summary["candidate_pairs"] = int(len(pairs))
        if len(pairs):
            sim_of = _verify(cfg, work, pairs, offsets, docs_paths, pool, nworkers)
            edges = pairs[sim_of >= cfg.near_threshold]
            summary["verified_pairs"] = int(len(edges))
            near_docs, near_roots = _clusters(edges)
            keep[near_docs] = False
            summary["near_dup"] = int(len(near_docs))
            pick = list(zip(near_roots[: cfg.drop_samples].tolist(), near_docs[: cfg.drop_samples].tolist()))
            summary["near_dup_samples"] = _near_samples(cfg, pick, offsets, docs_paths)
    if n:
        # each removed document's representative; an exact copy of a near duplicate goes to the near one's
        reps = np.concatenate([_follow(firsts, near_docs, near_roots), near_roots])
        _, size = np.unique(reps, return_counts=True)
        size = size + 1                      # the kept representative
        summary["largest_clusters"] = sorted(size.tolist(), reverse=True)[:10]
        summary["clusters"] = int(len(size))
        hist = np.bincount(size) if len(size) else np.zeros(0, np.int64)
        summary["cluster_size_histogram"] = {str(k): int(v) for k, v in enumerate(hist) if v}
    return keep, offsets, summary


def _follow(ids: np.ndarray, docs: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """ids, each replaced by its root where it is one of `docs` (sorted)."""
    if len(docs) == 0:
        return ids
    at = np.minimum(np.searchsorted(docs, ids), len(docs) - 1)
    return np.where(docs[at] == ids, roots[at], ids)


def _clusters(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(documents removed, their cluster's root), sorted by document: the connected components of
    the verified edges, over only the documents in them; each root is its component's lowest id."""
    ids, local = np.unique(edges, return_inverse=True)
    local = local.reshape(edges.shape)
    uf = UnionFind(len(ids))
    for i, j in local.tolist():
        uf.union(i, j)
    roots = ids[uf.roots()]
    dup = roots != ids
    return ids[dup], roots[dup]


def _in_part(ids: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The global ids in [lo, hi): those one part holds."""
    return ids[(ids >= lo) & (ids < hi)]


def _verify(cfg: DataSection, work: Path, pairs: np.ndarray, offsets: np.ndarray, docs_paths: list[Path],
            pool: Executor, nworkers: int) -> np.ndarray:
    """The true Jaccard of every candidate pair, computed by the shuffle of the module docstring."""
    vdir = work / "verify"
    # a killed run may have left chunks cut another way (data.workers is not part of the key)
    shutil.rmtree(vdir, ignore_errors=True)
    vdir.mkdir(parents=True)
    nchunks = max(nworkers, -(-len(pairs) // PAIRS_PER_CHUNK))
    chunks = np.array_split(np.arange(len(pairs)), min(nchunks, len(pairs)))
    wanted = [np.unique(pairs[c].reshape(-1)) for c in chunks]
    gathers, files = [], {v: [] for v in range(len(chunks))}
    for k, docs in enumerate(docs_paths):
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        mine = {v: _in_part(w, lo, hi) for v, w in enumerate(wanted)}
        mine = {v: w for v, w in mine.items() if len(w)}
        if not mine:
            continue
        out = {v: str(vdir / f"c{v:05d}-p{k:05d}.json") for v in mine}
        for v, path in out.items():
            files[v].append(path)
        gathers.append(pool.submit(_gather_texts, str(docs), lo, mine, out))
    for f in gathers:
        f.result()
    futs = [pool.submit(_verify_chunk, v, pairs[c], files[v], cfg.shingle_chars) for v, c in enumerate(chunks)]
    sims = np.concatenate([f.result() for f in futs])
    shutil.rmtree(vdir, ignore_errors=True)
    return sims


def _near_samples(cfg: dict, near: list[tuple[int, int]], offsets: np.ndarray, docs_paths: list[Path]) -> list[dict]:
    """A few (kept, dropped) near duplicates for stats.json, with their Jaccard."""
    if not near:
        return []
    wanted = np.unique(np.array(near).reshape(-1))
    texts: dict[int, str] = {}
    for k, docs in enumerate(docs_paths):
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        need = set((_in_part(wanted, lo, hi) - lo).tolist())
        if not need:
            continue
        for row, doc in enumerate(iter_jsonl(docs)):
            if row in need:
                texts[lo + row] = doc["text"]
    sim = ShingleJaccard(texts.__getitem__, cfg.shingle_chars)
    return [{"kept": texts[r][:150], "dropped": texts[d][:150], "jaccard": round(sim(r, d), 3)} for r, d in near]

