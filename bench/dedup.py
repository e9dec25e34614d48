"""Near-duplicate detection: our numpy MinHash + LSH against datasketch, on planted duplicates.

    .venv/bin/python bench/dedup.py [--quick]

The corpus: ~1,000-character documents cut from the built-in corpus (People's Daily
1998-01, then idiom paragraphs), all distinct, plus copies of random ones with random
character edits (substitutions, insertions, deletions drawn from the same text) at 0 %,
2 %, 5 % and 10 % of their characters. Both sides use the same shingles (character
5-grams), the same permutations and bands (120 = 15 × 8) and the same threshold (0.7).

- ours: `dedup.find_duplicates` end to end (exact hash, shingling, signatures, band keys,
  candidate pairs, true-Jaccard verification, union-find), one process.
- datasketch: the seed's method, streaming: for each document build a `MinHash` from its
  shingle set, query a `MinHashLSH(threshold, num_perm, params=(15, 8))`, drop it if
  anything is found, otherwise insert it.

Recall per edit rate = share of planted copies removed; precision = share of removed
documents that really are copies of a document kept before them. Rates are documents per
CPU-second of this process (`time.process_time`), so other work on a shared machine does
not skew the ratio. `bytes_per_doc` is what our index keeps per document: the LSH band keys
plus the exact hash (datasketch's in-memory index is measured with tracemalloc beside it).
Near duplicates are pairs at character-5-gram Jaccard >= 0.7: 2 % edits leave ~0.83, 5 % ~0.64
and 10 % ~0.43. Ours verifies every candidate on the true Jaccard, so it keeps the 5 % and
10 % copies (below the threshold, they are not duplicates by this definition); datasketch's
unverified LSH flags some of them by chance.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zero_chatgpt.data.builtin import iter_idiom_documents, iter_peoples_daily  # noqa: E402
from zero_chatgpt.data.clean import normalize  # noqa: E402
from zero_chatgpt.data.dedup import MinHasher, exact_hashes, find_duplicates, shingle_hashes  # noqa: E402

RATES = (0.0, 0.02, 0.05, 0.1)
NUM_PERM, BANDS, THRESHOLD, NGRAM = 120, 15, 0.7, 5


def edit(rng: random.Random, s: str, rate: float, source: str) -> str:
    """`s` with round(len(s) * rate) random character edits (a substitution, deletion or insertion each, new
    characters drawn from `source`). tests/data/test_data_dedup.py plants its duplicates with it too."""
    chars = list(s)
    for _ in range(round(len(chars) * rate)):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 1 / 3:
            chars[i] = source[rng.randrange(len(source))]
        elif op < 2 / 3:
            del chars[i]
        else:
            chars.insert(i, source[rng.randrange(len(source))])
    return "".join(chars)


def build_corpus(n_distinct: int, n_per_rate: int, seed: int = 0):
    text = "".join(normalize(d["text"]) for d in iter_peoples_daily())
    if len(text) < n_distinct * 1000:
        text += "".join(d["text"] for d in iter_idiom_documents())
    base = [text[i:i + 1000] for i in range(0, n_distinct * 1000, 1000)]
    base = [b for b in base if len(b) == 1000]
    rng = random.Random(seed)

    docs, family, rate_of = list(base), list(range(len(base))), [None] * len(base)
    for rate in RATES:
        for _ in range(n_per_rate):
            i = rng.randrange(len(base))
            docs.append(edit(rng, base[i], rate, text))
            family.append(i)
            rate_of.append(rate)
    return docs, np.array(family), rate_of, len(base)


def score(removed: np.ndarray, dup_of: np.ndarray, family: np.ndarray, rate_of: list, n_base: int) -> dict:
    recall = {}
    for rate in RATES:
        idx = [i for i, r in enumerate(rate_of) if r == rate]
        recall[str(rate)] = round(float(removed[idx].mean()), 4)
    flagged = np.flatnonzero(removed)
    true = sum(1 for i in flagged if i >= n_base and family[dup_of[i]] == family[i])
    precision = true / len(flagged) if len(flagged) else 1.0
    return {"recall": recall, "precision": round(precision, 4)}


def run_ours(docs):
    t = time.process_time()
    res = find_duplicates(docs, threshold=THRESHOLD, num_perm=NUM_PERM, bands=BANDS, ngram=NGRAM)
    return time.process_time() - t, ~res.keep, res.duplicate_of


def run_datasketch(docs):
    from datasketch import MinHash, MinHashLSH

    t = time.process_time()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS))
    removed = np.zeros(len(docs), dtype=bool)
    dup_of = np.full(len(docs), -1)
    for i, d in enumerate(docs):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in {d[j:j + NGRAM] for j in range(len(d) - NGRAM + 1)}])
        hits = lsh.query(m)
        if hits:
            removed[i] = True
            dup_of[i] = min(hits)
        else:
            lsh.insert(i, m)
    return time.process_time() - t, removed, dup_of


def datasketch_index_bytes(docs) -> float:
    """Memory a datasketch MinHashLSH holds per inserted document (tracemalloc, signatures built first)."""
    import tracemalloc

    from datasketch import MinHash, MinHashLSH

    sigs = []
    for d in docs:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in {d[j:j + NGRAM] for j in range(len(d) - NGRAM + 1)}])
        sigs.append(m)
    tracemalloc.start()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, NUM_PERM // BANDS))
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return used / len(docs)


def signature_rates(docs) -> dict:
    """The signature step alone (shingle hashes given), ours vs rensa's Rust MinHash, if installed.

    Measured as an option: rensa is much faster on this step, but the data stage is bound by
    cleaning (bench/clean.py: ~2,600 docs/s per core against ~8,000 for our whole MinHash), so
    a new native dependency would save little of the stage's time and change its signatures.
    """
    hs = [shingle_hashes(d, NGRAM) for d in docs]
    hasher = MinHasher(NUM_PERM, NGRAM, BANDS, threshold=THRESHOLD)
    t = time.process_time()
    hasher.signatures(docs)
    out = {"ours_signatures_docs_per_s": round(len(docs) / (time.process_time() - t), 1)}
    try:
        import rensa
    except ImportError:
        return out
    flat = np.concatenate(hs)
    offsets = np.concatenate(([0], np.cumsum([len(h) for h in hs]))).astype(np.uint64)
    t = time.process_time()
    rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, NUM_PERM, 1)
    out["rensa_signatures_docs_per_s"] = round(len(docs) / (time.process_time() - t), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller corpus (< 60 s)")
    args = ap.parse_args()
    n_distinct, n_per_rate = (1200, 150) if args.quick else (4000, 500)
    docs, family, rate_of, n_base = build_corpus(n_distinct, n_per_rate)
    print(f"corpus: {n_base} distinct documents + {len(docs) - n_base} planted copies "
          f"({n_per_rate} per edit rate), ~1,000 characters each", file=sys.stderr)

    t_ours, removed, dup_of = run_ours(docs)
    ours = score(removed, dup_of, family, rate_of, n_base)
    t_ds, removed_ds, dup_of_ds = run_datasketch(docs)
    peer = score(removed_ds, dup_of_ds, family, rate_of, n_base)

    hasher = MinHasher(NUM_PERM, NGRAM, BANDS, threshold=THRESHOLD)
    sample = docs[:1000]
    index_bytes = hasher.keys_for(sample).nbytes + exact_hashes(sample).nbytes
    ds_bytes = datasketch_index_bytes(sample)
    ours_rate, peer_rate = len(docs) / t_ours, len(docs) / t_ds
    sig = signature_rates(docs)
    print(f"ours:       {ours_rate:8.0f} docs/s  recall {ours['recall']}  precision {ours['precision']}",
          file=sys.stderr)
    print(f"datasketch: {peer_rate:8.0f} docs/s  recall {peer['recall']}  precision {peer['precision']}",
          file=sys.stderr)
    print(json.dumps({
        "speedup_vs_datasketch": round(ours_rate / peer_rate, 2),
        "recall": ours["recall"],
        "precision": ours["precision"],
        "bytes_per_doc": index_bytes / len(sample),
        "datasketch_bytes_per_doc": round(ds_bytes, 1),
        "docs_per_s_per_core": round(ours_rate, 1),
        "datasketch_docs_per_s_per_core": round(peer_rate, 1),
        "datasketch_recall": peer["recall"],
        "datasketch_precision": peer["precision"],
        **sig,
        "docs": len(docs),
        "num_perm": NUM_PERM, "bands": BANDS, "threshold": THRESHOLD, "shingle_chars": NGRAM,
    }))


if __name__ == "__main__":
    main()
