"""Helpers for tests that assemble a run directory by hand (a tokenizer saved directly, a model trained
through the loop without its stage function): record such outputs as finished stages, as their stage
functions would, so that the commands that read a run (chat, export, eval, later stages) accept them."""
import os
from pathlib import Path

from zero_chatgpt.core.io import atomic_write_json
from zero_chatgpt.core.rundir import MARKER, closure_key, output_id, read_marker
from zero_chatgpt.core.registry import STAGES


def skip_unless_ci(reason: str) -> None:
    """Skip a test that cannot run here, except in CI (CI=true), where a skip would check nothing: fail."""
    import pytest
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def previous_version(folder, rev: str) -> Path:
    """The package as commit `rev` had it, unpacked in `folder` (for PYTHONPATH): the real code of an earlier
    version, to check that what it made is read right. Skipped (failed under CI) where the clone lacks `rev`."""
    import subprocess
    repo = Path(__file__).resolve().parent.parent
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(f"git -C {repo} archive {rev} zero_chatgpt | tar -x -C {folder}", shell=True,
                         capture_output=True, text=True)
    if got.returncode != 0:
        skip_unless_ci(f"the earlier version ({rev}) is not in this clone's history: {got.stderr.strip()[:200]}")
    return folder


def record_stage(root, name: str, reads=(), inputs: dict | None = None) -> dict:
    """Mark stage `name` of run directory `root` complete, built from `inputs` and the stages `reads`."""
    root = Path(root)
    closure = {name: dict(inputs or {"built by": "test"})}
    for up in reads:
        m = read_marker(root / STAGES[up].out)
        closure[name][f"@{up}"] = m.get("output") or m["key"]
        closure.update(m["closure"])
    key = closure_key(closure)
    out = root / STAGES[name].out
    record = {"stage": name, "state": "complete", "key": key, "closure": closure, "reads": list(reads),
              "output": output_id(STAGES[name], out, key), "finished": "test", "summary": {}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MARKER, record)
    return record


# ---------------------------------------------------------------- a whole tiny pipeline, in seconds

def write_sources(folder) -> tuple[Path, Path]:
    """A pretraining corpus (jsonl, ~2,400 real review and news texts) and instruction data (messages
    jsonl, idiom meanings) in `folder`, small enough for every stage to run in seconds."""
    import itertools
    import json

    from zero_chatgpt.data.builtin import iter_peoples_daily, iter_reviews, load_idioms
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.jsonl"
    texts = [r["text"] for r in itertools.islice(iter_reviews(), 1200)]
    texts += [r["text"] for r in itertools.islice(iter_peoples_daily(), 1200)]
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    chat = folder / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"“{d['word']}”是什么意思？"},
                          {"role": "assistant", "content": d["explanation"][:60]}]}
            for d in load_idioms()[:400] if d["explanation"]]
    chat.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return corpus, chat


TINY = {
    "data.shard_docs": 300, "data.workers": 2,
    "tokenizer.vocab_size": 512, "tokenizer.num_threads": 1,
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 2,
    "model.num_attention_heads": 2, "model.max_position_embeddings": 64,
    "pretrain.seq_len": 32, "pretrain.micro_batch_size": 4, "pretrain.batch_tokens": 128, "pretrain.max_steps": 12,
    "pretrain.warmup_steps": 2, "pretrain.checkpoint_every": 4, "pretrain.eval_every": 4,
    "pretrain.eval_tokens": 512, "pretrain.samples": 0, "pretrain.tensorboard": False, "pretrain.log_every": 1,
    "pretrain.precision": "fp32",
    "sft.eval_fraction": 0.1, "sft.rl_fraction": 0.1, "sft.val_fraction": 0.1, "sft.max_steps": 9,
    "sft.warmup_steps": 2, "sft.batch_tokens": 256, "sft.micro_batch_tokens": 128, "sft.max_seq_len": 48,
    "sft.checkpoint_every": 3, "sft.eval_every": 3, "sft.tensorboard": False, "sft.log_every": 1,
    "sft.val_samples": 8, "sft.precision": "fp32",
    "eval.num_prompts": 4, "eval.max_new_tokens": 4, "eval.val_samples": 4,
}


def tiny_args(corpus=None, chat=None, **more) -> list[str]:
    """`--set` (and `--source`) arguments of the tiny pipeline, for cli.main or a subprocess."""
    import json
    args = []
    for k, v in {**TINY, **more}.items():
        args += ["--set", f"{k}={json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"]
    return args


def zc(*args, env=None, timeout=300, **kw):
    """`python -m zero_chatgpt ARGS` in a subprocess, progress bars off, one thread."""
    import os
    import subprocess
    import sys
    e = {**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "zero_chatgpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, **kw)


def node_tree(p) -> list:
    """A launcher and its workers (torchrun starts each worker in a session of its own, so killing
    the launcher's process group would leave the worker running)."""
    import psutil
    root = psutil.Process(p.pid)
    return [root] + root.children(recursive=True)


def kill(procs: list) -> None:
    import psutil
    for q in procs:
        try:
            q.kill()
            q.wait(10)
        except psutil.NoSuchProcess:
            pass
