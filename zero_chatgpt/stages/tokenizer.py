"""`zero-chatgpt tokenizer`: train the BPE tokenizer on a sample of data/, save tokenizer/, encode tokens/.

The stage is a recipe over two components: `zero_chatgpt.model.tokenizer` (train_bpe, Tokenizer,
load_tokenizer, the corpus sample) and `zero_chatgpt.model.shard_encoding` (corpus shards to token shards).
Its two steps resume separately: a kill while encoding keeps the trained tokenizer
(`tokenizer/.trained.json` records the key it was trained for) and the shards already encoded
(`tokens/manifest.json`).
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from zero_chatgpt.core.console import info, progress, table
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.io import atomic_write_json, corpus_shards
from zero_chatgpt.core.rundir import Context, begin
from zero_chatgpt.data.executors import executor_for
from zero_chatgpt.model import token_shards as tokens_mod
from zero_chatgpt.model.shard_encoding import MANIFEST, count_lines, file_sha, run_jobs, token_path
from zero_chatgpt.model.tokenizer import DEFAULT_PATTERN, load_tokenizer, sample_texts, special_tokens, train_bpe

TRAINED = ".trained.json"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def train_step(ctx: Context, key: str) -> float:
    """Train and save the tokenizer unless tokenizer/ already holds the one for `key`; its training time."""
    c, rd = ctx.cfg.tokenizer, ctx.run_dir
    out = rd.tokenizer
    done = _read_json(out / TRAINED)
    if done.get("key") == key and (out / "tokenizer.json").exists() and not ctx.force:
        return float(done.get("train_s", 0.0))
    t0 = time.perf_counter()
    sample = sample_texts(rd.data, "train", c.train_chars, c.max_doc_chars)
    info(f"training a {c.vocab_size}-token byte-level BPE on ~{sample.expected_chars:,} characters of {rd.data}")
    chars = 0

    def counted(texts):
        # rustbpe pulls the sample in buffers and counts pre-tokens, then learns merges.
        nonlocal chars
        with progress(total=sample.expected_chars, desc="counting pre-tokens", unit="char") as bar:
            for t in texts:
                chars += len(t)
                bar.update(len(t))
                yield t
        info(f"learning {c.vocab_size - 256 - len(special_tokens(c.reserved_tokens)):,} merges ...")

    tok = train_bpe(counted(sample), c.vocab_size, c.pattern or DEFAULT_PATTERN, c.reserved_tokens,
                    c.default_system_prompt)
    tok.save(out)
    train_s = time.perf_counter() - t0
    atomic_write_json(out / TRAINED, {"key": key, "train_chars": chars, "train_s": round(train_s, 2)})
    return train_s


def _executor(ctx: Context, tok):
    """Ray tasks when the data stage runs on Ray (data.executor = "ray"), else None: run_jobs' own pool."""
    data = ctx.cfg.data
    if data.executor != "ray":
        return None
    return executor_for(data, tok.num_threads)


def encode_step(ctx: Context, tok) -> dict:
    """Encode data/{train,val} into tokens/, skipping shards already encoded by this tokenizer from
    these corpus shards; returns {split: {shards, docs, tokens, chars}}."""
    rd = ctx.run_dir
    out = rd.stage_dir("tokens")
    tok_sha = file_sha(rd.tokenizer / "tokenizer.json")
    manifest_path = out / MANIFEST
    manifest = _read_json(manifest_path)
    if manifest.get("tokenizer") != tok_sha or ctx.force:
        manifest = {"tokenizer": tok_sha, "shards": {}}
    done = manifest["shards"]

    jobs, expected = [], set()
    for split in ("train", "val"):
        sources = corpus_shards(rd.data, split)
        if not sources and split == "train":
            raise UserError(f"no train corpus shards in {rd.data}; run `zero-chatgpt data --run-dir {rd.root}` first")
        for src in sources:
            dst = token_path(out, src)
            expected.add(dst.name)
            st = src.stat()
            ident = {"source": src.name, "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
            rec = done.get(dst.name)
            if rec and all(rec.get(k) == v for k, v in ident.items()) and dst.exists():
                try:
                    tokens_mod.open_shard(dst)
                    continue
                except UserError:
                    pass
            jobs.append((split, src, dst, ident))
    for stale in out.glob("*.bin"):
        if stale.name not in expected:
            stale.unlink()
    for name in [n for n in done if n not in expected]:
        del done[name]
    for tmp in out.glob("*.bin.tmp*"):     # left by a killed writer
        tmp.unlink()
    if len(jobs) < len(expected):
        info(f"tokens: {len(expected) - len(jobs)} of {len(expected)} shards already encoded, resuming")

    total_docs = sum(count_lines(src) for _, src, _, _ in jobs)
    with progress(total=total_docs, desc="encoding", unit="doc") as bar:
        for (split, src, dst, ident), stats in run_jobs(jobs, tok, rd.tokenizer, bar, executor=_executor(ctx, tok)):
            done[dst.name] = {**ident, "split": split, **stats}
            atomic_write_json(manifest_path, manifest)

    summary: dict = {}
    for rec in done.values():
        s = summary.setdefault(rec["split"], {"shards": 0, "docs": 0, "tokens": 0, "chars": 0})
        s["shards"] += 1
        for k in ("docs", "tokens", "chars"):
            s[k] += rec[k]
    return summary


def run_stage(ctx: Context) -> None:
    c, rd = ctx.cfg.tokenizer, ctx.run_dir
    run = begin(ctx, "tokenizer")
    if run.skip:
        return
    t0 = time.perf_counter()
    train_s = train_step(ctx, run.key)
    tok = load_tokenizer(rd.tokenizer, c.num_threads)
    summary = encode_step(ctx, tok)
    enc_s = time.perf_counter() - t0 - train_s
    run.complete({"vocab_size": tok.vocab_size, "tokens": summary, "train_s": round(train_s, 2)})
    rows = [["vocabulary size", tok.vocab_size], ["learned tokens (bytes + merges)", tok.n_learned]]
    for split, s in summary.items():
        rows.append([f"{split} documents", s["docs"]])
        rows.append([f"{split} tokens", s["tokens"]])
    val = summary.get("val", {})
    if val.get("tokens", 0) > val.get("docs", 0):   # not counting the <|endoftext|> after each document
        rows.append(["chars/token (val)", val["chars"] / (val["tokens"] - val["docs"])])
    rows += [["train time (s)", train_s], ["encode time (s)", enc_s], ["peak memory (MB)", _peak_rss_mb()]]
    table(["tokenizer", "value"], rows, title=f"tokenizer: {rd.tokenizer}  tokens: {rd.tokens}")

