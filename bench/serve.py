"""Serving under load: `zero-chatgpt serve` vs llama.cpp's OpenAI-compatible server, same model, same load.

Both servers run as subprocesses on 127.0.0.1 (free ports), side by side, and are always stopped at the end:

* ours: `zero-chatgpt serve` over the model of `--run-dir` (its chat model; `--stage` to pick one), with
  `--slots` slots (continuous batching);
* llama.cpp: llama-cpp-python's server (`python -m llama_cpp.server`, the `[server]` extra) over our GGUF
  export of the same model (`zero-chatgpt export --format gguf`, f16 weights by default: the export's default
  and llama.cpp's usual path; `--gguf-type f32` keeps the weights exact). That server has no parallel slots:
  one lock around its one `Llama` object serves one request at a time, in arrival order (its --help offers
  no n_parallel), so it runs with 1 slot whatever `--slots` says; the JSON records that. It runs with
  `--interrupt_requests False` (its default True cuts a running stream when another request arrives),
  `--logits_all False` (only the last position's logits, as ours), the same context and threads.

The load: for each concurrency C (1, 8, 32), C streaming clients (the official `openai` client, async,
no retries) send fixed Chinese chat prompts (idiom questions, chaining, small talk), one after another,
greedy (temperature 0; repetition penalty 1 on both sides: ours through `--set chat.repetition_penalty=1.0`,
llama.cpp through the request's `repeat_penalty`), with the same `max_tokens`, until `--requests`
requests have been sent or `--time-limit` seconds have passed; whatever still runs at 1.5x the time limit is
cut (counted as `cut`, its streamed tokens kept). A round runs every level on both servers, one after the other
(who goes first alternates); `--rounds` rounds (default 3, while `--budget` seconds allow), and a level's tokens/s
is the median of its rounds: on a shared machine another process's load comes and goes.

Measured per server and level: aggregate generated tokens/s (all tokens streamed / the wall time from the
first request to the last end), time to first token (first non-empty content chunk; for a request cut before
its first token, the time until the cut: a lower bound, counted in `ttft_censored`) p50 and p95, and errors
(an exception, an error event, or a stream that ends without a finish_reason). Tokens are counted the same way
for both: `max_tokens` for an answer that ended by length (both stop exactly there), else the answer text
re-encoded with the model's own tokenizer (our server's `usage`, which also counts the stop token, is kept as a
check; llama-cpp-python streams no usage).
Greedy answers are compared prompt by prompt (`same_answers`): between requests of one server (batching must
not change an answer) and between the two servers.

Models: `--model run` (default) serves `--run-dir`'s chat model (when that run has none, a demo-shaped random
model instead, said so); `--model seed-0.1b-random` / `demo-random`: a random-init model of that preset's
shape (the run's tokenizer, or one trained on the idiom dictionary when the run has none; the stop tokens'
output rows zeroed so that every answer runs to max_tokens).

    .venv/bin/python bench/serve.py [--quick] [--run-dir runs/demo] [--model run|seed-0.1b-random|demo-random]

Last stdout line: JSON with tokens_per_s {ours, llama_cpp} by concurrency, batching_speedup_32 (ours at 32 /
ours at 1), vs_llama_cpp_32 (ours / llama.cpp at 32), ttft_p95_s_32 {ours, llama_cpp}, errors (both servers,
all levels), and the settings (cpu, slots, max_tokens, requests, ...).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ZC_NO_PROGRESS", "1")

# Real chat prompts of the kinds the demo model was taught (as in sft_data/eval.jsonl), fixed.
PROMPTS = [
    "「画蛇添足」是什么意思？", "「爱屋及乌」出自哪里？", "守株待兔造句", "刻舟求剑这几个字怎么念？",
    "我说“一心一意”，你来接龙。", "成语“亡羊补牢”的意思是什么？", "你是谁？", "你能做什么？",
    "「对牛弹琴」是什么意思？", "「井底之蛙」出自哪里？", "用“半途而废”造一个句子", "掩耳盗铃怎么读？",
    "成语接龙：百发百中", "「塞翁失马」比喻什么？", "谢谢你！", "「胸有成竹」是什么意思？",
    "「杯弓蛇影」出自哪里？", "请用“滥竽充数”造句。", "狐假虎威的拼音是什么？", "我说“马到成功”，你来接龙。",
    "「自相矛盾」是什么意思？", "成语“叶公好龙”讲的是什么故事？", "你好，今天心情不太好。", "「卧薪尝胆」是什么意思？",
    "「望梅止渴」出自哪里？", "拔苗助长造句", "「鹬蚌相争」怎么念？", "成语接龙：心想事成",
    "「三顾茅庐」是什么意思？", "「纸上谈兵」说的是谁？", "给我讲一个成语吧。", "「草船借箭」是什么意思？",
]

SERVERS = ("ours", "llama_cpp")


# ---------------------------------------------------------------- pure helpers (tests/bench/test_bench_serve.py)

def percentile(values, q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Rec:
    """One request of a load run: times relative to the run's start (seconds)."""
    index: int
    prompt: str
    sent: float = 0.0
    first: float | None = None      # first non-empty content chunk (or the finish chunk of an empty answer)
    end: float | None = None
    text: str = ""
    finish: str | None = None
    usage_tokens: int | None = None
    error: str | None = None
    cut: bool = False
    tokens: int = 0
    chunks: int = 0                 # chunks that carried text


def summarize(recs: list[Rec], wall: float, server_cpu: float | None = None, client_cpu: float | None = None) -> dict:
    """One server at one concurrency: aggregate tokens/s, TTFT p50/p95 (cut-before-first-token requests count
    with their time until the cut, a lower bound), errors; with the CPU seconds the server process and the
    clients used during the run, those per 1,000 tokens."""
    tokens = sum(r.tokens for r in recs)
    ttft = [r.first - r.sent for r in recs if r.first is not None and r.error is None]
    censored = [r.end - r.sent for r in recs if r.first is None and r.cut]
    errors = [r for r in recs if r.error is not None]
    usage = [r.usage_tokens for r in recs if r.usage_tokens is not None]
    done = [r for r in recs if r.error is None and not r.cut]
    out = {
        "requests": len(recs), "completed": len(done), "cut": sum(r.cut for r in recs), "errors": len(errors),
        "tokens": tokens, "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 and tokens else 0.0,
        "ttft_p50_s": _round(percentile(ttft + censored, 50)), "ttft_p95_s": _round(percentile(ttft + censored, 95)),
        "ttft_censored": len(censored),
        "mean_answer_tokens": round(tokens / len(recs), 1) if recs else None,
        "text_chunks_per_token": round(sum(r.chunks for r in recs) / tokens, 3) if tokens else None,
        "finish": {k: sum(r.finish == k for r in done) for k in ("stop", "length")},
    }
    for key, v in (("server_cpu_s_per_1k_tokens", server_cpu), ("client_cpu_s_per_1k_tokens", client_cpu)):
        if v is not None and tokens and math.isfinite(v):
            out[key] = round(1000 * v / tokens, 3)
    if usage:
        out["usage_completion_tokens"] = sum(usage)
    if errors:
        out["error_samples"] = sorted({r.error for r in errors})[:3]
    return out


def combine(runs: list[tuple[list[Rec], float, float | None, float | None]]) -> dict:
    """Rounds (records, wall, server CPU s, client CPU s) of one server at one concurrency: tokens/s is the median
    of the rounds' aggregate tokens/s (another process's load comes and goes); TTFT, counts and CPU over all of
    their requests."""
    recs = [r for run in runs for r in run[0]]
    cpu = [sum(run[i] for run in runs) if all(run[i] is not None for run in runs) else None for i in (2, 3)]
    out = summarize(recs, sum(run[1] for run in runs), *cpu)
    rounds = [summarize(run[0], run[1])["tokens_per_s"] for run in runs]
    out["tokens_per_s"] = round(statistics.median(rounds), 1)
    out["tokens_per_s_rounds"] = rounds
    return out


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def final_json(results: dict, levels: list[int], extra: dict) -> dict:
    """The last stdout line. `results`: {server: {concurrency: summarize(...)} or None (not run)}."""
    def tps(server: str) -> dict | None:
        r = results.get(server)
        return None if r is None else {str(c): r[c]["tokens_per_s"] for c in levels if c in r}

    def at(server: str, c: int, key: str):
        r = results.get(server)
        return None if r is None or c not in r else r[c][key]

    top = max(levels)
    ours_top, ours_1 = at("ours", top, "tokens_per_s"), at("ours", 1, "tokens_per_s")
    errors = sum(s["errors"] for r in results.values() if r for s in r.values())
    return {
        "tokens_per_s": {s: tps(s) for s in SERVERS},
        f"batching_speedup_{top}": ratio(ours_top, ours_1),
        f"vs_llama_cpp_{top}": ratio(ours_top, at("llama_cpp", top, "tokens_per_s")),
        f"ttft_p95_s_{top}": {s: at(s, top, "ttft_p95_s") for s in SERVERS},
        "errors": errors,
        **extra,
    }


def same_answers(results_recs: dict) -> dict:
    """Greedy answers, from every finished request: per server, the prompts whose answers differed between
    requests (at any concurrency: batching must not change an answer); and the prompts answered by both servers,
    how many the same."""
    by, out = {}, {}
    for server in SERVERS:
        recs = results_recs.get(server)
        if not recs:
            continue
        texts: dict[str, set] = {}
        for level in recs.values():
            for r in level:
                if r.error is None and not r.cut:
                    texts.setdefault(r.prompt, set()).add(r.text)
        by[server] = {p: min(t) for p, t in texts.items()}
        out[f"{server}_prompts_with_differing_answers"] = sum(len(t) > 1 for t in texts.values())
    if len(by) == 2:
        common = sorted(set(by["ours"]) & set(by["llama_cpp"]))
        out["same_across_servers"] = {"same": sum(by["ours"][p] == by["llama_cpp"][p] for p in common),
                                      "prompts": len(common)}
    return out


def cpu_info() -> dict:
    name, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                k, _, v = line.partition(":")
                if k.strip() == "model name" and name == "unknown":
                    name = v.strip()
                elif k.strip() == "flags" and not flags:
                    flags = set(v.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {"model": name, "cores": len(os.sched_getaffinity(0)), "flags": [f for f in wanted if f in flags],
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------- servers

def default_threads(cores: int, load: float) -> int:
    """Threads per server: the cores that other work leaves idle (at least 1). Thread pools that spin at their
    barriers collapse when their threads share cores with another busy process: on 2 cores under a 2-core
    training job, llama.cpp with 2 threads took 20 s for 30 short answers that 1 thread answered in 0.8 s."""
    return max(1, min(cores, cores - int(load + 0.5)))


def safetensors_params(path: Path) -> int:
    """Parameters in a safetensors file, from its header (tied embeddings are stored once)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, its log in a file; ready when `ready_path` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, log: Path, env: dict):
        self.name, self.cmd, self.port, self.ready_path, self.log = name, cmd, port, ready_path, log
        self.base = f"http://127.0.0.1:{port}"
        self.fh = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=ROOT)

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with status {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.base + self.ready_path, timeout=2) as r:
                    if r.status == 200:
                        return json.loads(r.read())
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready after {timeout:g} s: {self.tail()}")

    def engine_s(self) -> dict | None:
        """Our server's engine time so far, {"prefill": s, "decode": s} (its /health); None for llama.cpp's."""
        if self.ready_path != "/health":
            return None
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                h = json.loads(r.read())
            return {"prefill": h["prefill_s"], "decode": h["decode_s"]}
        except (OSError, KeyError, ValueError):
            return None

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the server process has used so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def tail(self, n: int = 3) -> str:
        self.fh.flush()
        lines = [s for s in self.log.read_text(errors="replace").splitlines() if s.strip()]
        return " | ".join(lines[-n:]) or "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.fh.close()


def llama_cpp_missing() -> str | None:
    """Why llama-cpp-python's server cannot run here, or None."""
    for mod, pkg in (("llama_cpp", "llama-cpp-python"), ("sse_starlette", "sse-starlette"),
                     ("starlette_context", "starlette-context"), ("pydantic_settings", "pydantic-settings")):
        if importlib.util.find_spec(mod) is None:
            return (f"{pkg} is not installed: pip install -c requirements.lock 'llama-cpp-python[server]' "
                    "(builds llama.cpp from source, 8-19 min on 2 cores)")
    return None


# ---------------------------------------------------------------- models

def idiom_tokenizer(tmp: Path):
    """A 4,096-token BPE trained on the built-in idiom dictionary (for a run without a tokenizer)."""
    from zero_chatgpt.data.builtin import load_idioms
    from zero_chatgpt.model.tokenizer import train_bpe
    idioms = [d for d in load_idioms() if d.get("explanation")][:4000]
    tok = train_bpe([d["word"] + "：" + d["explanation"] for d in idioms], 4096)
    tok.save(tmp / "tokenizer")
    return tmp / "tokenizer"


def random_run(preset: str, tok_dir: Path | None, tmp: Path) -> Path:
    """A run directory holding a random-init model of `preset`'s shape as its sft/final, for `serve --stage sft`
    (and export): the tokenizer of `tok_dir` (or one trained on the idiom dictionary), no config.toml (the
    commands get --preset)."""
    import torch

    from zero_chatgpt.core import config
    from zero_chatgpt.core.checkpoint import save_checkpoint
    from zero_chatgpt.model.tokenizer import load_tokenizer
    from zero_chatgpt.model.transformer import Transformer, model_config_from
    rd = tmp / f"{preset}-random"
    rd.mkdir()
    if tok_dir is not None:
        shutil.copytree(tok_dir, rd / "tokenizer")
    else:
        idiom_tokenizer(rd)
    tok = load_tokenizer(rd / "tokenizer")
    cfg = model_config_from(config.load_preset(preset).model, tok.vocab_size)
    torch.manual_seed(0)
    m = Transformer(cfg)
    with torch.no_grad():
        m.lm_head.weight.mul_(30)              # peakier than at init: fewer near-ties in the greedy argmax
        m.lm_head.weight[list(tok.stop_ids)] = 0   # logit 0 for the stop tokens: answers run to max_tokens
    save_checkpoint(rd / "sft", "final", model_state=m.state_dict(), cfg=cfg)
    return rd


# ---------------------------------------------------------------- load

async def one_request(client, model: str, rec: Rec, t0: float, max_tokens: int, extra: dict) -> None:
    rec.sent = time.perf_counter() - t0
    parts = []
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": rec.prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, **extra)
        async with stream:
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    rec.usage_tokens = chunk.usage.completion_tokens
                for c in chunk.choices:
                    if c.delta is not None and c.delta.content:
                        if rec.first is None:
                            rec.first = time.perf_counter() - t0
                        parts.append(c.delta.content)
                        rec.chunks += 1
                    if c.finish_reason:
                        rec.finish = c.finish_reason
                        if rec.first is None:
                            rec.first = time.perf_counter() - t0
        if rec.finish is None:
            rec.error = "the stream ended without a finish_reason"
    except asyncio.CancelledError:
        rec.cut = True
        raise
    except Exception as e:   # noqa: BLE001 - every failure is a counted error, the run goes on
        rec.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    finally:
        rec.text = "".join(parts)
        rec.end = time.perf_counter() - t0


async def load_run(base: str, model: str, concurrency: int, requests: int, max_tokens: int, time_limit: float,
                   extra: dict, offset: int = 0) -> tuple[list[Rec], float]:
    """`concurrency` clients send requests one after another until `requests` are sent or `time_limit` s have
    passed; everything still running at 1.5 x time_limit is cut. Returns the records and the wall time."""
    from openai import AsyncOpenAI
    hard = 1.5 * time_limit
    client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0,
                         timeout=hard + 30)
    recs: list[Rec] = []
    counter = iter(range(requests))
    t0 = time.perf_counter()

    async def worker():
        for i in counter:
            if time.perf_counter() - t0 >= time_limit:
                return
            rec = Rec(i, PROMPTS[(offset + i) % len(PROMPTS)])
            recs.append(rec)
            await one_request(client, model, rec, t0, max_tokens, extra)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=hard)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    finally:
        await client.close()
    wall = max((r.end for r in recs if r.end is not None), default=time.perf_counter() - t0)
    return recs, wall


def count_tokens(recs: list[Rec], tok, max_tokens: int) -> None:
    """Generated tokens, counted alike for both servers: an answer that ended by length has max_tokens (both stop
    exactly there); any other (a stop token, an error, a cut) is its text re-encoded with the model's tokenizer
    (re-encoding a random model's byte soup, or text cut inside a character, is only close)."""
    for r in recs:
        r.tokens = max_tokens if r.finish == "length" else len(tok.encode(r.text)) if r.text else 0


# ---------------------------------------------------------------- main

def settings(a) -> dict:
    quick = a.quick
    levels = a.concurrency or [1, 8, 32]
    per_level = {1: 16, 8: 64, 32: 128} if quick else {1: 48, 8: 192, 32: 512}
    requests = {c: a.requests or per_level.get(c, 2 * c) for c in levels}
    return {"levels": levels, "requests": requests, "time_limit": a.time_limit or (8.0 if quick else 30.0),
            "max_tokens": a.max_tokens or (48 if quick else 64), "slots": a.slots or max(levels),
            "rounds": a.rounds or 3, "budget": a.budget or (30.0 if quick else 240.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter answers, shorter limits (< 60 s)")
    ap.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo", help="the run whose model is served "
                    "(default runs/demo); with --model *-random only its tokenizer is used")
    ap.add_argument("--model", default="run", choices=["run", "seed-0.1b-random", "demo-random"],
                    help="run: the run's chat model; PRESET-random: a random-init model of that preset's shape")
    ap.add_argument("--stage", default=None, help="the run's stage to serve (default: what `serve` picks)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default 1 8 32)")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: by level)")
    ap.add_argument("--max-tokens", type=int, default=0, help="max_tokens of every request (default 64; quick 48)")
    ap.add_argument("--time-limit", type=float, default=0, help="seconds per level and server to start requests "
                    "(cut at 1.5x; default 30, quick 8)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of every level and server, alternating "
                    "(default 3); tokens/s is the median of the rounds")
    ap.add_argument("--budget", type=float, default=0, help="seconds: a round after the first starts only if one "
                    "more round like the last fits in (default 240, quick 30)")
    ap.add_argument("--slots", type=int, default=0, help="our server's --slots (default: the top concurrency)")
    ap.add_argument("--threads", type=int, default=0, help="threads for each server (default: the cores left idle "
                    "by other work at the start, 1 or more)")
    ap.add_argument("--gguf-type", choices=["f16", "f32"], default="f16", help="weights of the GGUF export")
    ap.add_argument("--no-llama", action="store_true", help="measure our server only")
    a = ap.parse_args()
    s = settings(a)
    machine = cpu_info()
    threads = a.threads or default_threads(machine["cores"], machine["loadavg_at_start"][0])

    from zero_chatgpt.model.tokenizer import load_tokenizer
    tmp_obj = tempfile.TemporaryDirectory(prefix="zc-bench-serve-")
    tmp = Path(tmp_obj.name)
    servers: list[Server] = []
    notes = []
    try:
        run_dir, stage, preset_args, model_kind = a.run_dir.resolve(), a.stage, [], a.model
        has_tok = (run_dir / "tokenizer" / "tokenizer.json").is_file()
        if model_kind == "run" and not any((run_dir / st / "final").is_dir() for st in ("sft", "ppo", "dpo", "grpo")):
            notes.append(f"{run_dir} has no chat model: serving a demo-shaped random model instead "
                         "(`make demo` trains one)")
            model_kind = "demo-random"
        if model_kind != "run":
            preset = model_kind.removesuffix("-random")
            run_dir = random_run(preset, run_dir / "tokenizer" if has_tok else None, tmp)
            stage, preset_args = "sft", ["--preset", preset]
        for n in notes:
            print(f"note: {n}", file=sys.stderr, flush=True)
        tok = load_tokenizer(run_dir / "tokenizer")
        stage_args = ["--stage", stage] if stage else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ZC_NO_PROGRESS": "1"}

        # ours
        port = free_port()
        ours = Server("ours", [sys.executable, "-m", "zero_chatgpt", "serve", "--run-dir", str(run_dir), *preset_args,
                               *stage_args, "--port", str(port), "--slots", str(s["slots"]),
                               "--queue", str(max(64, 2 * max(s["levels"]))),
                               "--max-tokens", str(max(512, s["max_tokens"])),
                               "--set", "chat.repetition_penalty=1.0"], port, "/health", tmp / "ours.log", env)
        servers.append(ours)
        health = ours.wait_ready(180)
        model_id = health["model"]
        model_dir = run_dir / model_id / "final"
        mcfg = json.loads((model_dir / "config.json").read_text())
        context = int(mcfg["max_position_embeddings"])
        params_m = round(safetensors_params(model_dir / "model.safetensors") / 1e6, 2)
        print(f"ours: serving {model_id} ({model_dir}) on {ours.base}, {s['slots']} slots", file=sys.stderr,
              flush=True)

        # llama.cpp
        llama, why_not = None, ("--no-llama" if a.no_llama else llama_cpp_missing())
        gguf = tmp / "model.gguf"
        if why_not is None:
            r = subprocess.run([sys.executable, "-m", "zero_chatgpt", "export", "--run-dir", str(run_dir),
                                *preset_args, "--stage", model_id, "--format", "gguf", "--gguf-type", a.gguf_type,
                                "--out", str(gguf)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
            if r.returncode != 0:
                why_not = f"GGUF export failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
        if why_not is None:
            port = free_port()
            llama = Server("llama_cpp", [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                         "--model_alias", model_id, "--host", "127.0.0.1", "--port", str(port),
                                         "--n_ctx", str(context), "--n_threads", str(threads),
                                         "--n_threads_batch", str(threads), "--interrupt_requests", "False",
                                         "--logits_all", "False", "--verbose", "False"],
                           port, "/v1/models", tmp / "llama.log", env)
            servers.append(llama)
            try:
                llama.wait_ready(120)
                print(f"llama_cpp: serving {gguf.name} ({a.gguf_type}, {gguf.stat().st_size / 1e6:.1f} MB) on "
                      f"{llama.base}, 1 slot", file=sys.stderr, flush=True)
            except RuntimeError as e:
                why_not, llama = str(e)[:500], None
        if why_not is not None:
            print(f"llama_cpp: not measured ({why_not})", file=sys.stderr, flush=True)

        extra = {"ours": {"stream_options": {"include_usage": True}},
                 "llama_cpp": {"extra_body": {"repeat_penalty": 1.0}}}
        bases = {"ours": ours.base, "llama_cpp": llama.base if llama else None}
        procs = {"ours": ours, "llama_cpp": llama}
        order = [k for k in SERVERS if bases[k]]

        async def bench():
            for k in order:     # warm-up: first-call costs (weights paged in, lazy set-up) are not measured
                recs, _ = await load_run(bases[k], model_id, 1, 1, 8, 30.0, extra[k])
                if recs and recs[0].error:
                    print(f"{k}: warm-up request failed: {recs[0].error}", file=sys.stderr, flush=True)
            out = {k: {c: [] for c in s["levels"]} for k in order}
            engine = {c: {"prefill": 0.0, "decode": 0.0} for c in s["levels"]}   # our engine's time by level
            t_start, t_round, turn = time.monotonic(), 0.0, 0
            for rnd in range(s["rounds"]):
                if rnd and time.monotonic() - t_start + t_round > s["budget"]:
                    break
                t0 = time.monotonic()
                for c in s["levels"]:
                    for k in (order if turn % 2 == 0 else order[::-1]):     # who goes first alternates
                        cpu0, own0, eng0 = procs[k].cpu_s(), time.process_time(), procs[k].engine_s()
                        recs, wall = await load_run(bases[k], model_id, c, s["requests"][c], s["max_tokens"],
                                                    s["time_limit"], extra[k])
                        run = (recs, wall, procs[k].cpu_s() - cpu0, time.process_time() - own0)
                        eng1 = procs[k].engine_s()
                        if eng0 and eng1:
                            for part in engine[c]:
                                engine[c][part] += eng1[part] - eng0[part]
                        if any(r.cut for r in recs):
                            # the cut requests may still hold the server (llama.cpp's queue): one more request
                            # returns once they are gone, so that the next run starts on an idle server
                            await load_run(bases[k], model_id, 1, 1, 1, 120.0, extra[k])
                        count_tokens(recs, tok, s["max_tokens"])
                        out[k][c].append(run)
                        print(json.dumps({"server": k, "concurrency": c, "round": rnd + 1, **summarize(*run)},
                                         ensure_ascii=False), file=sys.stderr, flush=True)
                    turn += 1
                t_round = time.monotonic() - t0
            return out, engine

        raw, engine = asyncio.run(bench())
    finally:
        for srv in servers:
            srv.stop()
        tmp_obj.cleanup()

    results = {k: ({c: combine(runs) for c, runs in raw[k].items()} if k in raw else None) for k in SERVERS}
    rows = []
    for c in s["levels"]:
        for k in SERVERS:
            r = (results.get(k) or {}).get(c)
            if r is None:
                rows.append([c, k, "-", "-", "-", "-", "-", "-"])
                continue
            rows.append([c, k, f"{r['completed']}/{r['requests']}", r["tokens_per_s"], r["ttft_p50_s"],
                         r["ttft_p95_s"], r["errors"], r["cut"]])
    from zero_chatgpt.core.console import format_table
    print(format_table(["clients", "server", "done", "tokens/s", "TTFT p50 (s)", "TTFT p95 (s)", "errors", "cut"],
                       rows, title=f"{model_id}: {s['max_tokens']} max_tokens, greedy; ours {s['slots']} slots, "
                                   f"llama.cpp 1 slot (its server has no parallel slots)"), flush=True)
    try:
        llama_version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        llama_version = None
    extra_keys = {
        "llama_cpp": {"measured": llama is not None, "reason": why_not, "slots": 1 if llama is not None else None,
                      "version": llama_version, "gguf_type": a.gguf_type if llama is not None else None},
        "by_server": results,
        # The share of our engine's busy time spent on prompt forwards, by concurrency: the most that sharing a
        # common prompt prefix (a system prompt) across requests could save.
        "prefill_share": {str(c): ratio(e["prefill"], e["prefill"] + e["decode"]) for c, e in engine.items()},
        "engine_s": {str(c): {k: round(v, 3) for k, v in e.items()} for c, e in engine.items()},   # all rounds
        "same_answers": same_answers({k: {c: [r for run in runs for r in run[0]] for c, runs in raw[k].items()}
                                      for k in raw}),
        "token_count": "max_tokens for an answer that ended by length, else its text re-encoded with the model's "
                       "tokenizer (both servers alike)",
        "model": {"kind": model_kind, "stage": model_id, "params_m": params_m, "context": context,
                  "layers": mcfg["num_hidden_layers"], "hidden": mcfg["hidden_size"], "vocab": mcfg["vocab_size"]},
        "slots": {"ours": s["slots"], "llama_cpp": 1 if llama is not None else None},
        "max_tokens": s["max_tokens"], "requests": {str(c): n for c, n in s["requests"].items()},
        "rounds": max(len(runs) for r in raw.values() for runs in r.values()),
        "time_limit_s": s["time_limit"], "threads": threads, "cpu": machine, "quick": a.quick, "notes": notes,
    }
    print(json.dumps(final_json(results, s["levels"], extra_keys), ensure_ascii=False))


if __name__ == "__main__":
    main()
