"""The seed's recipe rehearsed on this machine: every stage run by the real commands with the `seed-0.1b`
preset, on inputs in the seed's own formats, at sizes this machine holds, measured and extrapolated to the
seed's sizes before anyone rents a GPU.

    .venv/bin/python bench/rehearse.py [--quick] [--sizes 100,300,1200] [--sft-records 100000,300000,1100000]
                                       [--tokenizer-chars 500000000] [--machines 8] [--keep DIR]

Inputs, built from the built-in text (People's Daily 1998-01 and the idiom paragraphs; bench/data_scale.py's
sentence pool) with variation, so deduplication keeps them: each document draws its own sentences at random,
and 5 % are planted exact copies. `--sizes` are millions of characters of pretraining text per size, split
between the three pretraining sources as the seed mixes them:
- wikipedia-cn: one JSON array of {completion, source} (long articles);
- baidubaike: JSON lines {title, summary, sections: [{title, content}], url};
- skypile: a directory of *.jsonl shards of {text};
- firefly: JSON lines {kind, input, target} (the original firefly-train-1.1M), `--sft-records` of them, and
  ruozhiba: ShareGPT JSON lines, 1.5 % as many.

Per stage it measures wall seconds, peak memory (the sum of RSS over the command's whole process tree, sampled
every 50 ms), disk written, and the throughput the extrapolation uses:
- data: `zero-chatgpt data` at each size (a fresh run directory each); characters/s per core and the peak
  memory against the input, fitted as a power law over the sizes and extrapolated to the seed's corpus
  (the characters of 10B tokens at the measured characters per token), on one machine and on N under Ray;
- tokenizer: `zero-chatgpt tokenizer` (the 32k vocabulary) on the largest size, trained on `--tokenizer-chars`
  sampled characters (the seed's ~1.5 GB sample), and HF `tokenizers`' BPE trainer on as many characters of
  the same text beside it; tokens/s of the encoder;
- pretrain: the 0.1B model for a few steps from those shards (micro-batch 1 on this CPU), its checkpoint's
  size and the seconds to write and verify it, a `kill -9` mid-run and the resume; the batch source's memory
  on the smallest and the largest corpus (memory-mapped shards: it must not grow with the corpus);
- sft: `zero-chatgpt sft` on firefly + ruozhiba at each `--sft-records` size (cleaning, dedup, split, a few
  steps), the builder's time and memory extrapolated to the seed's 1.1M records;
- rm / ppo / dpo / grpo: a few steps each on the 0.1B model (tiny rollouts), peak memory;
- export: HF and GGUF; llama.cpp (llama-cpp-python) loads the GGUF and its greedy continuation is compared
  with ours; `zero-chatgpt serve` answers one chat request.
A stage that fails is recorded with its error (a wall found) and the rehearsal goes on.

`--quick` (under a minute): a small model (--set model.*) and tiny sizes, data through SFT and the HF export.
The last line is JSON: {"stages": {...}, "sizes": {...}, "extrapolated": {...}, "walls": [...]}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from data_scale import run_measured, sentences, slope  # noqa: E402
from zero_chatgpt.core import config  # noqa: E402
from zero_chatgpt.train.plan import RESERVED_GB, plan  # noqa: E402

SEED_TOKENS = 10e9                 # the seed's pretraining budget
SEED_SFT_RECORDS = 1_100_000       # firefly-train-1.1M (+ ruozhiba's ~1.5k)
QUICK_MODEL = ["model.hidden_size=64", "model.intermediate_size=176", "model.num_hidden_layers=2",
               "model.num_attention_heads=2", "tokenizer.vocab_size=1200", "pretrain.seq_len=128",
               "model.max_position_embeddings=256", "sft.max_seq_len=256"]


# ---------------------------------------------------------------- measuring a command

def run(cmd: list[str], **kw) -> dict:
    """`cmd` from the repository root, measured (data_scale.run_measured: seconds, peak memory of the process
    tree, exit code, kill -9 on `kill_when`, output tail)."""
    return run_measured(cmd, cwd=ROOT, **kw)


def zc(*args: str, sets: list[str] = (), **kw) -> dict:
    cmd = [sys.executable, "-m", "zero_chatgpt", *map(str, args)]
    for s in sets:
        cmd += ["--set", s]
    return run(cmd, **kw)


def disk_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2 ** 20, 1) \
        if Path(path).exists() else 0.0


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of y = a x^b, least squares in log-log."""
    b = slope(xs, ys)
    a = math.exp(sum(math.log(y) - b * math.log(x) for x, y in zip(xs, ys)) / len(xs))
    return a, b


# ---------------------------------------------------------------- inputs in the seed's formats

class Writer:
    def __init__(self, pool: list[str], seed: int):
        self.pool, self.rng = pool, random.Random(seed)

    def doc(self, lo: int, hi: int) -> str:
        return "".join(self.rng.choice(self.pool) for _ in range(self.rng.randint(lo, hi)))

    def pretraining(self, folder: Path, chars: int) -> dict:
        """wikipedia-cn (40 %), baidubaike (40 %), skypile (20 %) with 5 % exact copies each."""
        folder.mkdir(parents=True, exist_ok=True)
        made = {"chars": 0, "docs": 0}
        kept: list[str] = []

        def take(lo, hi):
            if kept and self.rng.random() < 0.05:
                return self.rng.choice(kept)
            d = self.doc(lo, hi)
            if len(kept) < 5000:
                kept.append(d)
            made["chars"] += len(d)
            made["docs"] += 1
            return d

        with open(folder / "wikipedia-cn.json", "w", encoding="utf-8") as f:
            f.write("[")
            n, first = 0, True
            while n < 0.4 * chars:
                d = take(12, 40)
                n += len(d)
                f.write(("" if first else ",\n") + json.dumps({"completion": d, "source": "wikipedia.zh2307"},
                                                              ensure_ascii=False))
                first = False
            f.write("]")
        with open(folder / "baidubaike.json", "w", encoding="utf-8") as f:
            n = 0
            while n < 0.4 * chars:
                title = self.rng.choice(self.pool)[:6]
                secs = [{"title": self.rng.choice(self.pool)[:5], "content": take(1, 3)}
                        for _ in range(self.rng.randint(1, 2))]
                rec = {"title": title, "summary": take(1, 2), "sections": secs, "url": f"https://baike.example/{n}"}
                made["baike_entries"] = made.get("baike_entries", 0) + 1
                n += sum(len(s["content"]) for s in secs) + len(rec["summary"])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        sky = folder / "skypile"
        sky.mkdir(exist_ok=True)
        for k in range(2):
            with open(sky / f"2023-{k:02d}.jsonl", "w", encoding="utf-8") as f:
                n = 0
                while n < 0.1 * chars:
                    d = take(3, 15)
                    n += len(d)
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        made["bytes"] = int(disk_mb(folder) * 2 ** 20)
        made["wikipedia_mb"] = round((folder / "wikipedia-cn.json").stat().st_size / 2 ** 20, 1)
        return made

    def sft(self, folder: Path, records: int) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "firefly.jsonl", "w", encoding="utf-8") as f:
            for i in range(records):
                q = self.doc(1, 2)[:60] + "请解释。"
                f.write(json.dumps({"kind": "MRC", "input": q, "target": self.doc(1, 4)}, ensure_ascii=False) + "\n")
        with open(folder / "ruozhiba.jsonl", "w", encoding="utf-8") as f:
            for i in range(max(10, records * 15 // 1000)):
                f.write(json.dumps({"conversations": [{"from": "human", "value": self.doc(1, 1)[:40] + "？"},
                                                      {"from": "gpt", "value": self.doc(1, 3)}]},
                                   ensure_ascii=False) + "\n")
        return {"records": records, "bytes": int(disk_mb(folder) * 2 ** 20)}


# ---------------------------------------------------------------- the stages

def sources(folder: Path) -> list[str]:
    return ["--source", f"wikipedia-cn:{folder / 'wikipedia-cn.json'}", "--source",
            f"baidubaike:{folder / 'baidubaike.json'}", "--source", f"skypile:{folder / 'skypile'}"]


def data_stage(base: Path, sizes: list[float], w: Writer, model_sets: list[str], walls: list) -> dict:
    rows = {}
    for mchars in sizes:
        inp = base / f"input-{mchars:g}M"
        made = w.pretraining(inp, int(mchars * 1e6))
        rd = base / f"run-{mchars:g}M"
        shutil.rmtree(rd, ignore_errors=True)
        r = zc("data", "--preset", "seed-0.1b", "--run-dir", rd, *sources(inp), sets=["data.workers=0", *model_sets])
        if r["rc"] != 0:
            walls.append({"stage": "data", "size": mchars, "error": r["tail"][-600:]})
            continue
        stats = json.loads((rd / "data" / "stats.json").read_text())
        # the stage's own seconds (interpreter start excluded), which the extrapolation scales
        stage_s = float(json.loads((rd / "report" / "timings.json").read_text())["stages"]["data"]["seconds"])
        rows[f"{mchars:g}M"] = {"input_mb": round(made["bytes"] / 2 ** 20, 1), "wikipedia_json_mb": made["wikipedia_mb"],
                                "baike_entries": made.get("baike_entries", 0), "docs_in": stats["docs_in"],
                                "docs_out": stats["docs_out"], "chars_in": stats["chars_in"],
                                "seconds": r["seconds"], "stage_seconds": stage_s, "peak_mem_mb": r["peak_mem_mb"],
                                "disk_mb": disk_mb(rd / "data"),
                                "chars_per_s_per_core": round(stats["chars_in"] / stage_s / os.cpu_count()),
                                "exact_dup": stats["dropped"].get("exact_dup", 0),
                                "near_dup": stats["dropped"].get("near_dup", 0)}
        print(f"data {mchars:g}M chars: {r['seconds']} s, peak {r['peak_mem_mb']} MB, "
              f"{rows[f'{mchars:g}M']['docs_in']:,} docs", file=sys.stderr, flush=True)
    return rows


def tokenizer_stage(rd: Path, model_sets: list[str], walls: list, vocab: int, train_chars: int) -> dict:
    """Ours (the stage: training on tokenizer.train_chars sampled characters, then encoding everything), and HF
    `tokenizers`' BPE trainer on the same number of characters (the first documents of the same shards)."""
    r = zc("tokenizer", "--run-dir", rd, sets=[*model_sets] + ([f"tokenizer.train_chars={train_chars}"] if train_chars else []))
    if r["rc"] != 0:
        walls.append({"stage": "tokenizer", "error": r["tail"][-600:]})
        return {"error": r["tail"][-300:]}
    man = json.loads((rd / "tokens" / "manifest.json").read_text())
    tokens = sum(int(v.get("tokens", 0)) for v in man["shards"].values())
    chars = sum(int(v.get("chars", 0)) for v in man["shards"].values())
    trained = json.loads((rd / "tokenizer" / ".trained.json").read_text())
    train_s = float(trained.get("train_s", 0.0))
    out = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"], "disk_mb": disk_mb(rd / "tokens"),
           "tokens": tokens, "chars_per_token": round(chars / max(1, tokens), 3), "train_chars": trained.get("train_chars"),
           "train_seconds": train_s,
           "encode_tokens_per_s": round(tokens / max(1e-9, r["seconds"] - train_s))}
    # HF tokenizers' BPE trainer (what the seed used) on as many characters of the same text, in its own process
    code = f"""
import json, sys, time, zstandard, io
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
def texts():
    left = {int(trained.get("train_chars") or 0) or 10 ** 12}
    for p in sorted(Path({str(rd / 'data')!r}).glob('train-*.jsonl.zst')):
        with open(p, 'rb') as f:
            for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding='utf-8'):
                t = json.loads(line)['text']
                yield t
                left -= len(t)
                if left <= 0:
                    return
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
t0 = time.perf_counter()
tok.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size={vocab}, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""
    h = run([sys.executable, "-c", code])
    out["hf_tokenizers_train"] = {"seconds": h["seconds"], "peak_mem_mb": h["peak_mem_mb"], "rc": h["rc"]}
    return out


def pretrain_stage(base: Path, rd: Path, small_rd: Path | None, model_sets: list[str], walls: list,
                   quick: bool) -> dict:
    steps = 2 if quick else 4
    common = ["pretrain.batch_tokens=" + ("128" if quick else "1024"), "pretrain.micro_batch_size=1",
              "pretrain.compile=false", "pretrain.eval_every=0", "pretrain.samples=0", "pretrain.log_every=1",
              "pretrain.warmup_steps=1", "pretrain.checkpoint_every=1", *model_sets]
    if not quick:
        common.append("pretrain.eval_tokens=2048")
    mem = {}
    if small_rd is not None:        # the batch source memory-maps the shards: memory must not follow the corpus
        for name, where in (("smallest", small_rd), ("largest", rd)):
            m = zc("pretrain", "--run-dir", where, "--force", sets=["pretrain.max_steps=2", *common])
            mem[name] = {"peak_mem_mb": m["peak_mem_mb"] if m["rc"] == 0 else None,
                         "token_shards_mb": disk_mb(where / "tokens")}
            if m["rc"] != 0:
                walls.append({"stage": "pretrain", "corpus": name, "error": m["tail"][-600:]})
    # kill -9 once the first step checkpoint is written, then the same command resumes
    first = rd / "pretrain" / "step-1"
    k = zc("pretrain", "--run-dir", rd, "--force", sets=[f"pretrain.max_steps={steps}", *common],
           kill_when=lambda: (first / "meta.json").exists() or (first / "model.safetensors").exists())
    r = zc("pretrain", "--run-dir", rd, sets=[f"pretrain.max_steps={steps}", *common])
    if r["rc"] != 0:
        walls.append({"stage": "pretrain", "error": r["tail"][-600:]})
        return {"error": r["tail"][-300:]}
    log = [json.loads(x) for x in (rd / "logs" / "pretrain.jsonl").read_text().splitlines() if x.strip()]
    train = [x for x in log if "loss" in x]
    final = rd / "pretrain" / "final"
    step_dirs = sorted((rd / "pretrain").glob("step-*"))
    t0 = time.perf_counter()
    v = run([sys.executable, "-c", "import sys; from zero_chatgpt.core import manifest; "
             f"p = manifest.problem(__import__('pathlib').Path({str(step_dirs[-1]) if step_dirs else str(final)!r})); "
             "print(p); sys.exit(1 if p else 0)"])
    out = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"], "steps": steps,
           "killed_at_step_1": bool(k["killed"]), "resumed": "resum" in r["tail"].lower(),
           "tokens_per_s": round(sum(x.get("tokens_per_s", 0) for x in train[-2:]) / max(1, len(train[-2:])), 1),
           "checkpoint_mb": disk_mb(step_dirs[-1]) if step_dirs else None, "final_mb": disk_mb(final),
           "verify_seconds": round(time.perf_counter() - t0, 2), "checkpoint_intact": v["rc"] == 0}
    if mem:
        out["memory_by_corpus"] = mem
    # what `zero-chatgpt plan` estimates for this run (its GPU reserve left out: this is a CPU process)
    cfg = config.resolve(rd, None, [f"pretrain.max_steps={steps}", *common])
    est = (plan(cfg)["stages"]["pretrain"]["memory_gb"]["ddp"] - RESERVED_GB) * 1e9 / 2 ** 20
    out["plan_estimate_mb"] = round(est, 1)
    out["plan_estimate_vs_measured"] = round(est / r["peak_mem_mb"], 3) if r["peak_mem_mb"] else None
    return out


def sft_stage(base: Path, rd: Path, records: list[int], w: Writer, model_sets: list[str], walls: list,
              quick: bool) -> dict:
    """The instruction-data builder (read, clean by question length, MinHash dedup, split) at each size, in a
    process of its own so its memory is its own; then `zero-chatgpt sft` (builder + a few steps of the 0.1B
    model) on the largest."""
    rows = {}
    for n in records:
        inp = base / f"sft-{n}"
        w.sft(inp, n)
        specs = [f"firefly:{inp / 'firefly.jsonl'}", f"ruozhiba:{inp / 'ruozhiba.jsonl'}"]
        code = (f"import json; from pathlib import Path; from zero_chatgpt.core import config; "
                f"from zero_chatgpt.data import chat_data; "
                f"cfg = config.resolve(Path({str(base / 'cfg')!r}), 'seed-0.1b', [], {{'sft': {specs!r}}}); "
                f"print(json.dumps(chat_data.build(cfg, Path({str(base / f'sft-out-{n}')!r}))['records']))")
        r = run([sys.executable, "-c", code])
        if r["rc"] != 0:
            walls.append({"stage": "sft data", "records": n, "error": r["tail"][-600:]})
            continue
        rows[str(n)] = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"],
                        "input_mb": round(disk_mb(inp), 1), "records_kept": json.loads(r["tail"].strip().splitlines()[-1])}
        shutil.rmtree(base / f"sft-out-{n}", ignore_errors=True)
        print(f"sft data {n:,} records: {r['seconds']} s, peak {r['peak_mem_mb']} MB", file=sys.stderr, flush=True)
    n = records[-1]
    inp = base / f"sft-{n}"
    sets = ["sft.max_steps=2", "sft.batch_tokens=" + ("256" if quick else "1024"),
            "sft.micro_batch_tokens=" + ("256" if quick else "1024"), "sft.compile=false", "sft.eval_every=0",
            "sft.val_samples=8", "sft.checkpoint_every=0", "sft.warmup_steps=1", *model_sets]
    r = zc("sft", "--run-dir", rd, "--force", "--source", f"firefly:{inp / 'firefly.jsonl'}",
           "--source", f"ruozhiba:{inp / 'ruozhiba.jsonl'}", sets=sets)
    if r["rc"] != 0:
        walls.append({"stage": "sft", "records": n, "error": r["tail"][-600:]})
        return {"builder": rows, "error": r["tail"][-300:]}
    print(f"sft {n:,} records + 2 steps: {r['seconds']} s, peak {r['peak_mem_mb']} MB", file=sys.stderr, flush=True)
    return {"builder": rows, "train": {"records": n, "seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"],
                                       "sft_data_mb": disk_mb(rd / "sft_data"), "steps": 2}}


def rl_stages(rd: Path, model_sets: list[str], walls: list) -> dict:
    out = {}
    tiny = ["rl.max_new_tokens=8", "rl.gold_prompts=4", "rl.gold_max_new_tokens=8", *model_sets]
    plans = {
        "rm": ["rm.prompts=64", "rm.gold_samples=2", "rm.max_steps=2", "rm.batch_pairs=8", "rm.micro_batch_pairs=4",
               "rm.eval_every=0", "rm.checkpoint_every=0", "rm.warmup_steps=1"],
        "ppo": ["ppo.max_steps=2", "ppo.prompts_per_rollout=4", "ppo.gen_batch_size=4", "ppo.eval_every=0",
                "ppo.checkpoint_every=0", "ppo.warmup_steps=1"],
        "dpo": ["dpo.max_steps=2", "dpo.batch_pairs=8", "dpo.micro_batch_pairs=4", "dpo.eval_every=0",
                "dpo.checkpoint_every=0", "dpo.warmup_steps=1"],
        "grpo": ["grpo.max_steps=2", "grpo.prompts_per_rollout=2", "grpo.samples_per_prompt=2",
                 "grpo.gen_batch_size=4", "grpo.eval_every=0", "grpo.checkpoint_every=0", "grpo.warmup_steps=1"],
    }
    for stage, sets in plans.items():
        r = zc(stage, "--run-dir", rd, sets=[*tiny, *sets])
        out[stage] = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"], "ok": r["rc"] == 0}
        if r["rc"] != 0:
            walls.append({"stage": stage, "error": r["tail"][-600:]})
            out[stage]["error"] = r["tail"][-300:]
        print(f"{stage}: {r['seconds']} s, peak {r['peak_mem_mb']} MB, rc {r['rc']}", file=sys.stderr, flush=True)
    return out


def export_stage(base: Path, rd: Path, walls: list, quick: bool) -> dict:
    out = {}
    stage = "sft"
    hf = base / "export-hf"
    shutil.rmtree(hf, ignore_errors=True)
    r = zc("export", "--run-dir", rd, "--stage", stage, "--format", "hf", "--out", hf)
    out["hf"] = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"], "disk_mb": disk_mb(hf), "ok": r["rc"] == 0}
    if r["rc"] != 0:
        walls.append({"stage": "export hf", "error": r["tail"][-600:]})
    if quick:
        return out
    gg = base / "model.gguf"
    gg.unlink(missing_ok=True)
    r = zc("export", "--run-dir", rd, "--stage", stage, "--format", "gguf", "--out", gg)
    out["gguf"] = {"seconds": r["seconds"], "peak_mem_mb": r["peak_mem_mb"],
                   "disk_mb": round(gg.stat().st_size / 2 ** 20, 1) if gg.exists() else None, "ok": r["rc"] == 0}
    if r["rc"] != 0:
        walls.append({"stage": "export gguf", "error": r["tail"][-600:]})
        return out
    code = f"""
import json
from llama_cpp import Llama
from zero_chatgpt.core.checkpoint import load_model
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.tokenizer import load_tokenizer
tok = load_tokenizer({str(rd / 'tokenizer')!r})
model = load_model({str(rd / stage / 'final')!r})
llm = Llama(model_path={str(gg)!r}, n_ctx=256, verbose=False, n_threads=2)
same = []
for p in ["中国", "成语", "今天的天气"]:
    ids = tok.encode(p)
    ours = generate(model, [ids], max_new_tokens=8, temperature=0.0)[0].tokens
    theirs = []
    llm.reset()
    for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
        theirs.append(int(t))
        if len(theirs) == len(ours):
            break
    same.append(ours == theirs)
print(json.dumps({{"greedy_equal": same}}))
"""
    lc = run([sys.executable, "-c", code])
    try:
        out["llama_cpp"] = json.loads(lc["tail"].strip().splitlines()[-1]) | {"seconds": lc["seconds"]}
    except (ValueError, IndexError):
        out["llama_cpp"] = {"error": lc["tail"][-300:]}
        walls.append({"stage": "llama.cpp load", "error": lc["tail"][-600:]})
    # serve: one chat request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "serve", "--run-dir", str(rd), "--stage", stage,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    t0, answer = time.perf_counter(), None
    try:
        while time.perf_counter() - t0 < 180 and answer is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                             data=json.dumps({"model": stage, "max_tokens": 8, "messages": [
                                                 {"role": "user", "content": "你好"}]}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    answer = json.loads(resp.read())["choices"][0]["message"]["content"]
            except OSError:
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    out["serve"] = {"answered": answer is not None, "seconds_to_first_answer": round(time.perf_counter() - t0, 1)}
    if answer is None:
        walls.append({"stage": "serve", "error": "no answer within 180 s"})
    return out


# ---------------------------------------------------------------- extrapolation

def extrapolate(data: dict, tok: dict, sft: dict, machines: int) -> dict:
    out = {}
    if len(data) >= 2 and tok.get("tokens"):
        xs = [v["chars_in"] for v in data.values()]
        a_t, b_t = fit(xs, [v["stage_seconds"] for v in data.values()])
        a_m, b_m = fit(xs, [v["peak_mem_mb"] for v in data.values()])
        largest = list(data.values())[-1]
        chars_per_token = largest["chars_in"] / max(1, tok["tokens"])
        full = SEED_TOKENS * chars_per_token
        # linear in characters from the largest size's rate (cleaning goes by characters; the fitted exponent over
        # small sizes is below 1 because of fixed start-up costs, and would promise too little)
        hours = full / (largest["chars_in"] / largest["stage_seconds"]) / 3600
        out["data"] = {"seed_chars": full, "chars_per_token": round(chars_per_token, 3),
                       "time_exponent": round(b_t, 3), "memory_exponent": round(b_m, 3),
                       "hours_this_machine": round(hours, 1), f"hours_{machines}_machines_ray": round(hours / machines, 2),
                       "hours_power_law": round(a_t * full ** b_t / 3600, 1),
                       "peak_mem_gb_this_machine": round(a_m * full ** b_m / 1024, 1),
                       "note": "power laws fitted over the sizes; the dedup index is spread over part files, "
                               "so memory grows with the parts in flight, not the corpus"}
    sft = sft.get("builder", {})
    if len(sft) >= 2:
        xs = [int(k) for k in sft]
        a_t, b_t = fit(xs, [v["seconds"] for v in sft.values()])
        a_m, b_m = fit(xs, [v["peak_mem_mb"] for v in sft.values()])
        out["sft_builder"] = {"records": SEED_SFT_RECORDS, "time_exponent": round(b_t, 3),
                              "minutes": round(a_t * SEED_SFT_RECORDS ** b_t / 60, 1),
                              "memory_exponent": round(b_m, 3),
                              "peak_mem_gb": round(a_m * SEED_SFT_RECORDS ** b_m / 1024, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model and tiny sizes: data through SFT (< 1 min)")
    ap.add_argument("--sizes", default="", help="millions of characters of pretraining text, comma-separated "
                                                "(default 100,300,1200: the largest a ~1.3 GB Wikipedia array and "
                                                "~2M Baike entries; --quick 0.2,0.4,0.8)")
    ap.add_argument("--sft-records", default="", help="firefly records per builder size (default 100000,300000,1100000: "
                                                      "the last is firefly-train-1.1M's size)")
    ap.add_argument("--tokenizer-chars", type=int, default=500_000_000,
                    help="characters the tokenizer trains on at the largest size (default 500M: ~1.5 GB of UTF-8, the "
                         "seed's sample; the preset's own default is 200M)")
    ap.add_argument("--machines", type=int, default=8, help="machines of this kind under Ray, for the data stage's "
                                                            "extrapolation (default 8)")
    ap.add_argument("--keep", default="", help="keep the inputs and run directories under this folder")
    a = ap.parse_args()
    sizes = [float(x) for x in a.sizes.split(",")] if a.sizes else ([0.2, 0.4, 0.8] if a.quick else [100, 300, 1200])
    records = [int(x) for x in a.sft_records.split(",")] if a.sft_records else \
        ([300, 600] if a.quick else [100_000, 300_000, 1_100_000])
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="zc-rehearse-"))
    base.mkdir(parents=True, exist_ok=True)
    model_sets = QUICK_MODEL if a.quick else []
    w = Writer(sentences(), seed=0)
    walls: list[dict] = []
    t0 = time.perf_counter()
    try:
        data = data_stage(base, sizes, w, model_sets, walls)
        runs = [base / f"run-{s:g}M" for s in sizes if f"{s:g}M" in data]
        big = runs[-1]
        vocab = 1200 if a.quick else 32000
        tok = tokenizer_stage(big, model_sets, walls, vocab, 0 if a.quick else a.tokenizer_chars)
        small = None
        if not a.quick and len(runs) > 1 and zc("tokenizer", "--run-dir", runs[0])["rc"] == 0:
            small = runs[0]
        pre = pretrain_stage(base, big, small, model_sets, walls, a.quick)
        sft = sft_stage(base, big, records, w, model_sets, walls, a.quick)
        rl = {} if a.quick else rl_stages(big, model_sets, walls)
        export = export_stage(base, big, walls, a.quick)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    res = {"stages": {"data": data, "tokenizer": tok, "pretrain": pre, "sft": sft, **rl, "export": export},
           "sizes": {"pretraining_chars_m": sizes, "sft_records": records, "quick": a.quick},
           "extrapolated": extrapolate(data, tok, sft, a.machines),
           "walls": [{k: (v[-300:] if isinstance(v, str) else v) for k, v in x.items()} for x in walls],
           "seconds": round(time.perf_counter() - t0, 1),
           "cpu": {"cores": os.cpu_count()}}
    print(json.dumps(res, ensure_ascii=False))


if __name__ == "__main__":
    main()
