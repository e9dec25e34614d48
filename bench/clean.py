"""Cleaning throughput: documents per second per core on ~1,000-character Chinese documents.

    .venv/bin/python bench/clean.py [--quick]

Documents are cut from the raw built-in corpus (People's Daily 1998-01 with its
full-width digits, and product/book reviews), so normalization has real work to do.
`Cleaner.clean` runs every rule of the default config: NFKC keeping Chinese punctuation,
citation and punctuation fixes, whitespace, length, CJK count and ratio, line punctuation,
duplicate lines, top character 2/3/4-grams, repeated 5/7/10/13-grams, PII masking.

Peer, in the same run: the same filters written the plain way (`collections.Counter` over
string slices, a set per n-gram size, a regex for CJK), after the same normalization, as a
pure-Python pipeline would do it. Both must agree on every keep/drop decision. Rates are documents per CPU-second of this process (`time.process_time`),
so other work on a shared machine does not skew them. The last line printed is JSON with
`docs_per_s_per_core`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zero_chatgpt.core.settings import DataSection  # noqa: E402
from zero_chatgpt.data.builtin import iter_peoples_daily, iter_reviews  # noqa: E402
from zero_chatgpt.data.clean import _CJK, TERMINAL, Cleaner  # noqa: E402


def build_docs(n: int) -> list[dict]:
    pd = "\n".join(d["text"] for d in iter_peoples_daily())
    rv = "\n".join(d["text"] for d in iter_reviews())
    docs = []
    for k in range(n):
        src = pd if k % 2 == 0 else rv
        start = (k // 2) * 1000 % (len(src) - 1000)
        docs.append({"text": src[start:start + 1000], "meta": {}})
    return docs


def naive_check(cleaner: Cleaner, text: str) -> str | None:
    """The same rules as Cleaner.check, the straightforward way (the peer)."""
    c = cleaner.cfg
    L = len(text)
    if L < c.min_chars:
        return "too_short"
    n_cjk = len(_CJK.findall(text))
    if n_cjk < c.min_cjk_chars:
        return "few_cjk"
    if n_cjk < c.min_cjk_ratio * L:
        return "cjk_ratio"
    if "\n" in text:
        lines = text.split("\n")
        if sum(ln.endswith(TERMINAL) for ln in lines) < c.min_line_punct_ratio * len(lines):
            return "line_punct"
        if len(lines) - len(set(lines)) > c.max_dup_line_frac * len(lines):
            return "dup_lines"
    for n, limit in zip(c.top_ngram_n, c.top_ngram_max):
        counts = Counter(text[i:i + n] for i in range(L - n + 1))
        if counts and min(1.0, counts.most_common(1)[0][1] * n / L) > limit:
            return "top_ngram"
    for n, limit in zip(c.dup_ngram_n, c.dup_ngram_max):
        seen, covered = set(), [False] * L
        for i in range(L - n + 1):
            g = text[i:i + n]
            if g in seen:
                covered[i:i + n] = [True] * n
            else:
                seen.add(g)
        if L and sum(covered) / L > limit:
            return "dup_ngram"
    return None


def naive_clean(cleaner: Cleaner, text: str) -> str | None:
    s = cleaner.normalize(text)  # same normalization (NFKC is C code either way)
    return naive_check(cleaner, s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer documents (< 60 s)")
    args = ap.parse_args()
    n = 3000 if args.quick else 12000
    docs = build_docs(n)
    cleaner = Cleaner(DataSection())
    cleaner.clean(docs[0])  # warm up

    t = time.process_time()
    ours = [cleaner.clean(d)[1] for d in docs]
    t_ours = time.process_time() - t

    m = max(300, n // 6)  # the peer is slow: time it on a prefix
    t = time.process_time()
    peer = [naive_clean(cleaner, d["text"]) for d in docs[:m]]
    t_peer = time.process_time() - t
    disagree = sum(a != b for a, b in zip(ours[:m], peer))

    ours_rate, peer_rate = n / t_ours, m / t_peer
    kept = sum(r is None for r in ours)
    print(f"{n} docs of ~1,000 chars: ours {ours_rate:,.0f} docs/s, plain Counter/set version {peer_rate:,.0f} "
          f"docs/s; kept {kept}, drops {dict(Counter(r for r in ours if r))}; decisions differing: {disagree}",
          file=sys.stderr, flush=True)
    print(json.dumps({
        "docs_per_s_per_core": round(ours_rate, 1),
        "chars_per_s_per_core": round(ours_rate * 1000, 1),
        "naive_docs_per_s_per_core": round(peer_rate, 1),
        "speedup_vs_naive": round(ours_rate / peer_rate, 2),
        "decisions_differing": disagree,
        "docs": n,
    }))


if __name__ == "__main__":
    main()
