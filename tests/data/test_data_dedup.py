"""Exact and near-duplicate detection on real text with planted duplicates."""
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from zero_chatgpt.core.settings import DataSection
from zero_chatgpt.data.builtin import iter_peoples_daily
from zero_chatgpt.data.clean import normalize
from zero_chatgpt.data.dedup import (
    MinHasher,
    UnionFind,
    candidate_pairs,
    candidate_probability,
    exact_hash,
    find_duplicates,
    jaccard,
    lsh_params,
    shingle_hashes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from dedup import edit  # noqa: E402 - the benchmark's planted-duplicate edits, shared


@pytest.fixture(scope="module")
def corpus():
    text = "".join(normalize(d["text"]) for d in itertools.islice(iter_peoples_daily(), 700))
    return text, [text[i:i + 600] for i in range(0, 300 * 600, 600)]


def test_planted_duplicates_removed_distinct_kept(corpus):
    text, base = corpus
    rng = random.Random(0)
    docs, family = list(base), list(range(len(base)))
    for rate in (0.0, 0.0, 0.01, 0.02):
        for _ in range(40):
            i = rng.randrange(len(base))
            docs.append(edit(rng, base[i], rate, text))
            family.append(i)
    res = find_duplicates(docs)
    n = len(base)
    assert res.keep[:n].all(), "a distinct document was removed"
    removed = np.flatnonzero(~res.keep)
    assert len(removed) >= 0.97 * (len(docs) - n)  # near-copies at <= 2 % edits: ~0.98 expected
    # every removed document points at a kept member of its own family
    for i in removed:
        j = res.duplicate_of[i]
        assert res.keep[j] and family[j] == family[i]
    assert res.n_exact >= 80 - 5 and res.n_exact + res.n_near == len(removed)
    assert sum(res.cluster_sizes) - len(res.cluster_sizes) == len(removed)


def test_exact_only_and_order(corpus):
    _, base = corpus
    docs = [base[1], base[0], base[1], base[2], base[0]]
    res = find_duplicates(docs, near=False)
    assert res.keep.tolist() == [True, True, False, True, False]
    assert res.duplicate_of.tolist() == [-1, -1, 0, -1, 1] and res.n_exact == 2
    assert res.cluster_sizes == [2, 2]
    assert find_duplicates([], near=True).keep.shape == (0,)


def test_signature_agreement_estimates_jaccard(corpus):
    text, base = corpus
    rng = random.Random(3)
    h = MinHasher(num_perm=256, bands=16)
    errs = []
    for k in range(20):
        a = base[k]
        b = edit(rng, a, rng.choice([0.02, 0.05, 0.1, 0.2]), text)
        sa, sb = h.signatures([a, b])
        est = float((sa == sb).mean())
        true = jaccard(np.unique(shingle_hashes(a)), np.unique(shingle_hashes(b)))
        errs.append(est - true)
    assert abs(np.mean(errs)) < 0.03 and max(map(abs, errs)) < 0.12
    # signatures do not depend on the batch a document is in
    s1 = h.signatures(base[:20])
    s2 = np.concatenate([h.signatures(base[:7]), h.signatures(base[7:20], block_shingles=2000)])
    assert (s1 == s2).all()


def test_candidate_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 6, size=(40, 3)).astype(np.uint64)
    pairs = {tuple(p) for p in candidate_pairs(keys).tolist()}
    uf_pairs, uf_brute = UnionFind(40), UnionFind(40)
    for i, j in pairs:
        assert i < j and (keys[i] == keys[j]).any()
        uf_pairs.union(i, j)
    for i in range(40):
        for j in range(i + 1, 40):
            if (keys[i] == keys[j]).any():
                uf_brute.union(i, j)
    assert (uf_pairs.roots() == uf_brute.roots()).all()
    assert all(uf_brute.find(i) <= i for i in range(40))  # roots are the smallest member


def test_lsh_parameters():
    assert lsh_params(120, 0.7, 15) == (15, 8)
    b, r = lsh_params(128, 0.75)
    assert abs((1 / b) ** (1 / r) - 0.75) < 0.03 and b * r <= 128
    assert candidate_probability(0.83, 15, 8) > 0.97
    assert candidate_probability(0.3, 15, 8) < 0.001
    h = MinHasher(num_perm=120, bands=15)
    keys = h.keys_for(["今天天气很好。" * 20, ""])
    assert keys.shape == (2, 15) and keys.dtype == np.uint64 and keys.nbytes / 2 == 120


@pytest.mark.parametrize("nworkers,pairs_per_chunk", [(1, 20_000), (3, 7)])
def test_dedup_over_parts_equals_in_memory(corpus, tmp_path, monkeypatch, nworkers, pairs_per_chunk):
    """The data stage's partitioned dedup (by hash, by band, by chunk of pairs, as executor tasks over
    files) keeps the same documents as find_duplicates over the whole list, however the work is cut."""
    from concurrent.futures import ThreadPoolExecutor

    from zero_chatgpt.core.io import JsonlZstWriter
    from zero_chatgpt.core.workers import InlineExecutor
    from zero_chatgpt.data import dedup_parts

    text, base = corpus
    rng = random.Random(1)
    docs = list(base[:150])
    for rate in (0.0, 0.01, 0.02):
        docs += [edit(rng, base[rng.randrange(150)], rate, text) for _ in range(30)]
    rng.shuffle(docs)
    want = find_duplicates(docs)
    hasher = MinHasher()
    cuts = [0, 17, 18, 120, 121, len(docs)]      # uneven parts, one of a single document
    index, files, sizes = [], [], []
    for k in range(len(cuts) - 1):
        part = docs[cuts[k]:cuts[k + 1]]
        index.append(tmp_path / f"part-{k}.npz")
        np.savez(index[-1], exact=np.array([exact_hash(t) for t in part], dtype=np.uint64), keys=hasher.keys_for(part))
        files.append(tmp_path / f"part-{k}.jsonl.zst")
        with JsonlZstWriter(files[-1]) as w:
            for t in part:
                w.write({"text": t})
        sizes.append(len(part))
    monkeypatch.setattr(dedup_parts, "PAIRS_PER_CHUNK", pairs_per_chunk)
    cfg = DataSection(exact_dedup=True, near_dedup=True, near_threshold=0.7, shingle_chars=5, drop_samples=3)
    pool = InlineExecutor() if nworkers == 1 else ThreadPoolExecutor(nworkers)
    keep, offsets, summary = dedup_parts.deduplicate(cfg, tmp_path, index, files, sizes, hasher.bands, pool, nworkers)
    assert offsets.tolist() == cuts
    assert keep.tolist() == want.keep.tolist()
    assert summary["exact_dup"] == want.n_exact and summary["near_dup"] == want.n_near >= 40
    assert sorted(summary["largest_clusters"], reverse=True) == want.cluster_sizes[:10]
    assert summary["verified_pairs"] <= summary["candidate_pairs"]
    hist = summary["cluster_size_histogram"]
    assert sum((int(k) - 1) * v for k, v in hist.items()) == want.n_exact + want.n_near   # every removal in a cluster
    assert sum(hist.values()) == summary["clusters"] == len(want.cluster_sizes)
    assert len(summary["near_dup_samples"]) == 3 and all(s["jaccard"] >= 0.7 for s in summary["near_dup_samples"])
    assert not (tmp_path / "verify").exists()
