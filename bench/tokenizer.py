"""Tokenizer benchmark: our trainer/encoder against HF `tokenizers` and sentencepiece.

On the same text sample (the built-in Chinese corpus, NFKC-normalized as the data stage
leaves it, documents cut to max_doc_chars) and the same vocabulary size, it measures:
  - training time and peak memory of: ours (rustbpe + HF export), HF tokenizers' BPE trainer
    (ByteLevel pre-tokenizer with its defaults), sentencepiece BPE with byte fallback (character
    coverage 0.995 below a 16k vocabulary: 0.9995 needs more than 4k characters on this corpus).
    Each trainer runs in its own subprocess, which reports its own peak RSS
    (getrusage RUSAGE_SELF), so one trainer's memory never shows up in another's figure.
  - characters per token on held-out text, for all three;
  - encoding throughput (MB/s per core) of ours (tiktoken in a thread pool: the tokens/ stage's
    corpus encoder, and beside it Tokenizer.encode_batch, which returns lists) against HF
    `tokenizers` `encode_batch` (rayon), all loading the tokenizer we trained, all on all cores;
    the ids are checked to be identical. Per core = MB per CPU-second of the process (all
    threads), best of 3 interleaved runs; wall-clock MB/s is reported beside it.

    .venv/bin/python bench/tokenizer.py [--quick] [--vocab N]

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import unicodedata
import zlib
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"] + [f"<|reserved_{i}|>" for i in range(4)]


def _iter_train(path: str):
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def child(kind: str, train: str, vocab: int, out: str) -> dict:
    """Train one tokenizer (run in a subprocess) and report its time and this process's peak RSS."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if kind == "ours":
        from zero_chatgpt.model.tokenizer import train_bpe
        train_bpe(_iter_train(train), vocab).save(out)
    elif kind == "hf":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()          # its defaults
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_iter_train(train), trainer)
        tok.save(str(out / "tokenizer.json"))
    elif kind == "spm":
        import sentencepiece as spm
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_train(train), model_prefix=str(out / "spm"), model_type="bpe",
            vocab_size=vocab, byte_fallback=True, character_coverage=0.995 if vocab < 16000 else 0.9995,
            max_sentence_length=1 << 16,
            user_defined_symbols=SPECIALS, num_threads=os.cpu_count() or 1, minloglevel=2)
    else:
        raise SystemExit(f"unknown trainer {kind}")
    train_s = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"train_s": train_s, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_mb": ru.ru_maxrss / 1024}


def run_child(kind: str, train: Path, vocab: int, out: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", kind, "--train", str(train), "--vocab", str(vocab),
                        "--out", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} trainer failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def corpus(max_doc_chars: int) -> tuple[list[str], list[str]]:
    from zero_chatgpt.data.builtin import iter_builtin_documents
    train, val = [], []
    for r in iter_builtin_documents():
        t = unicodedata.normalize("NFKC", r["text"])[:max_doc_chars]
        (val if zlib.crc32(t.encode()) % 50 == 0 else train).append(t)
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~1.5M-character sample (finishes in < 60 s)")
    ap.add_argument("--vocab", type=int, default=0,
                    help="vocabulary size for all three trainers (default: 32000 as the seed-0.1b preset; "
                         "quick: 4096 as the demo preset)")
    ap.add_argument("--train-chars", type=int, default=0, help="characters of training text (default: all, quick: 1.5M)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.train, args.vocab, args.out)))
        return

    args.vocab = args.vocab or (4096 if args.quick else 32000)
    train, val = corpus(max_doc_chars=10_000)
    budget = args.train_chars or (1_500_000 if args.quick else 10**12)
    # an even sample: every k-th document, so news, reviews and idioms are all in it
    stride = max(1, int(sum(map(len, train)) / budget))
    sample = train[::stride]
    n = sum(map(len, sample))
    cores = os.cpu_count() or 1
    print(f"training text: {len(sample):,} documents, {n:,} characters; held out: {len(val):,} documents, "
          f"{sum(map(len, val)):,} characters; vocab {args.vocab}; {cores} cores", file=sys.stderr)

    results, cpt = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_file = tmp / "train.jsonl"
        with open(train_file, "w", encoding="utf-8") as fh:
            for t in sample:
                fh.write(json.dumps(t, ensure_ascii=False) + "\n")
        for kind in ("ours", "hf", "spm"):
            results[kind] = run_child(kind, train_file, args.vocab, tmp / kind)
            print(f"{kind:5s} train {results[kind]['train_s']:.2f}s (cpu {results[kind]['cpu_s']:.2f}s)  "
                  f"peak {results[kind]['peak_mb']:.0f} MB",
                  file=sys.stderr)

        from tokenizers import Tokenizer as HFTokenizer
        import sentencepiece as spm
        from zero_chatgpt.model.tokenizer import load_tokenizer
        ours = load_tokenizer(tmp / "ours")
        hf_trained = HFTokenizer.from_file(str(tmp / "hf" / "tokenizer.json"))
        sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm" / "spm.model"))
        n_val = sum(map(len, val))
        cpt["ours"] = n_val / sum(map(len, ours.encode_batch(val)))
        cpt["hf"] = n_val / sum(len(e.ids) for e in hf_trained.encode_batch(val, add_special_tokens=False))
        cpt["spm"] = n_val / sum(map(len, sp.encode(val)))
        assert all(ours.decode(ids) == t for ids, t in zip(ours.encode_batch(val[:200]), val[:200]))

        # Encoding: the same tokenizer (ours, exported) through both encoders.
        hf_ours = HFTokenizer.from_file(str(tmp / "ours" / "tokenizer.json"))
        enc_texts = (val + sample)[: 2_000 if args.quick else 12_000]
        mb = sum(len(t.encode()) for t in enc_texts) / 1e6
        a = ours.encode_batch(enc_texts)
        b = [e.ids for e in hf_ours.encode_batch(enc_texts, add_special_tokens=False)]
        identical = a == b
        # interleaved repetitions (the machine may be shared: take each one's best); per-core
        # throughput = MB per CPU-second over all threads, which contention does not inflate
        # "ours" is the corpus encoder of the tokens/ stage (encode.ShardEncoder: numpy ids + eot
        # per document); "ours_list" is Tokenizer.encode_batch, which returns Python lists.
        from zero_chatgpt.model.shard_encoding import ShardEncoder
        shard_encoder = ShardEncoder(ours, cores)
        docs = [d for f in shard_encoder.submit(enc_texts) for d in f.result()]
        identical = identical and all(list(d[:-1]) == ids for d, ids in zip(docs, a))
        wall = {"ours": [], "ours_list": [], "hf": []}
        cpu = {k: [] for k in wall}
        runs = {"ours": lambda: [d for f in shard_encoder.submit(enc_texts) for d in f.result()],
                "ours_list": lambda: ours.encode_batch(enc_texts),
                "hf": lambda: hf_ours.encode_batch(enc_texts, add_special_tokens=False)}
        for _ in range(3):
            for k, fn in runs.items():
                c0, w0 = time.process_time(), time.perf_counter()
                fn()
                wall[k].append(time.perf_counter() - w0)
                cpu[k].append(time.process_time() - c0)
        shard_encoder.close()

    enc = {k: mb / min(cpu[k]) for k in cpu}
    enc_wall = {k: mb / min(wall[k]) for k in wall}
    print(f"encode {mb:.1f} MB, MB/s per core (wall MB/s): " + ", ".join(
        f"{k} {enc[k]:.2f} ({enc_wall[k]:.2f})" for k in enc) + f"; identical ids: {identical}", file=sys.stderr)
    out = {
        "train_speedup_vs_hf": round(results["hf"]["train_s"] / results["ours"]["train_s"], 2),
        "encode_speedup_vs_hf": round(enc["ours"] / enc["hf"], 2),
        "chars_per_token": {k: round(v, 4) for k, v in cpt.items()},
        "peak_mem_mb": {k: round(results[k]["peak_mb"], 1) for k in ("ours", "hf")},
        "train_s": {k: round(r["train_s"], 3) for k, r in results.items()},
        "train_cpu_s": {k: round(r["cpu_s"], 3) for k, r in results.items()},
        "spm_peak_mem_mb": round(results["spm"]["peak_mb"], 1),
        "encode_mb_s_per_core": {k: round(v, 3) for k, v in enc.items()},
        "encode_mb_s_wall": {k: round(v, 3) for k, v in enc_wall.items()},
        "encode_speedup_vs_hf_wall": round(enc_wall["ours"] / enc_wall["hf"], 2),
        "encode_batch_speedup_vs_hf": round(enc["ours_list"] / enc["hf"], 2),
        "train_speedup_vs_hf_cpu": round(results["hf"]["cpu_s"] / results["ours"]["cpu_s"], 2),
        "encode_ids_identical": identical,
        "vocab_size": args.vocab, "train_chars": n, "cores": cores, "quick": args.quick,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
