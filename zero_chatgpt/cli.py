"""The `zero-chatgpt` command: one subcommand per stage, plus `run` for the whole recipe.

Every subcommand takes --run-dir, --preset and --set; stage-specific flags are documented in
each subcommand's --help. The stages and their order come from core/registry.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

from zero_chatgpt.core import config as config_mod
from zero_chatgpt.core import timings
from zero_chatgpt.core.console import info, is_main_process, table
from zero_chatgpt.core.errors import UserError, os_error_line
from zero_chatgpt.core.registry import PIPELINE, READ_ONLY, STAGES, TOOLS, Stage, is_built, model_stages
from zero_chatgpt.core.rundir import Context, RunDir, pick_model
from zero_chatgpt.core.runlock import RunLock
from zero_chatgpt.core.settings import describe_keys

EPILOG = """\
The run directory defaults to runs/<preset> (runs/demo without --preset), so runs of
different presets never share a directory. A run directory remembers its config
(config.toml: the preset, every --set and --source given so far): later commands on it
need none of them again.

Stages skip themselves when their inputs are unchanged and resume when interrupted. A
trained stage whose inputs changed is never retrained silently: the command names the
changed keys and stops; --force retrains it, a raised max_steps continues it.
"""


def _common(p: argparse.ArgumentParser, read_only: bool = False) -> None:
    p.add_argument("--run-dir", default=None, type=Path,
                   help="the run directory every stage reads and writes (default: runs/<preset>, i.e. runs/demo)")
    p.add_argument("--preset", default=None,
                   help=f"config preset for a new run ({', '.join(config_mod.preset_names())}); default: the run's "
                        "saved config.toml, else demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.lr=3e-4 (repeatable; remembered by the run"
                        + (", except here: this command only reads the run" if read_only else "") + ")")
    if not read_only:
        p.add_argument("--force", action="store_true",
                       help="rebuild even if up to date; for a trained stage whose inputs changed, retrain it "
                            "(deletes its checkpoints)")


def _sources(p: argparse.ArgumentParser, what: str, formats: str = "text, jsonl, parquet, wikipedia-cn, "
             "baidubaike, skypile, firefly, ruozhiba, sharegpt, prompt-answer, messages, preference") -> None:
    p.add_argument("--source", dest="sources", action="append", default=[], metavar="FORMAT:PATH",
                   help=f"{what} (repeatable; remembered in the run's config.toml). FORMAT is a reader: {formats}")


def _checked(convert, ok, kind: str, bound: str):
    """An argparse type: `convert` the text (a ValueError: not `kind` at all), then refuse it unless `ok`."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} {bound}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
        return v
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a whole number", ">= 1")
_nonnegative_int = _checked(int, lambda v: v >= 0, "a whole number", ">= 0")
_port = _checked(int, lambda v: 0 <= v <= 65535, "a port number", "0..65535 (0 picks a free one)")
_positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a number", "finite and > 0")


def _help_for(st: Stage) -> str:
    return st.help + ("" if is_built(st) else " [not built yet in this version]")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zero-chatgpt", description=__doc__.split("\n")[0], epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    order = " → ".join(s.name for s in PIPELINE)
    p = sub.add_parser("run", help=f"run the whole recipe ({order}), skipping what is up to date",
                       description=f"Run every stage in order: {order}. Each is skipped when up to date and resumed "
                                   "when interrupted; a summary says what each did.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--until", choices=list(STAGES), default=None, help="stop after this stage")

    lm = [s.name for s in model_stages()]
    for st in (*PIPELINE, *TOOLS.values()):
        keys = f"config keys it reads (defaults shown; a preset or --set changes them):\n\n" \
               f"{describe_keys(st.sections)}" if st.sections else None
        p = sub.add_parser(st.name, help=_help_for(st), description=_help_for(st), epilog=keys,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p, read_only=st.name in READ_ONLY)
        if st.name == "data":
            _sources(p, "pretraining text to read instead of the built-in corpus")
        if st.name == "sft":
            _sources(p, "instruction data to read instead of the built-in instructions")
        if st.name == "rm":
            _sources(p, "preference pairs to train on instead of the pairs built from the SFT model", "preference "
                        "(JSON lines {prompt, chosen, rejected})")
        if st.name == "eval":
            p.add_argument("--stage", default=None, choices=lm, help="evaluate only this stage; default: all trained")
            p.add_argument("--bench", action="append", default=None, metavar="NAME:DIR",
                           help="instead of the held-out prompts, score a standard benchmark from its files on disk: "
                                "ceval:DIR (DIR/dev, DIR/val: C-Eval's CSVs) or cmmlu:DIR (DIR/dev, DIR/test); "
                                "repeatable. Accuracy per subject and overall, beside chance, for every trained "
                                "stage, in RUN_DIR/eval/bench_NAME.json (scored as lm-evaluation-harness does)")
            p.add_argument("--shots", type=_nonnegative_int, default=5,
                           help="solved examples from the subject's dev split before each question (default 5, as "
                                "C-Eval and CMMLU report)")
        if st.name in ("chat", "serve", "export"):
            p.add_argument("--stage", default=None, choices=lm,
                           help="which trained model to load; default: the last stage in pipeline order whose model "
                                "is complete and current (it says which it picked and why)")
        if st.name == "chat":
            p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="longest answer, in tokens")
        if st.name == "serve":
            p.add_argument("--host", default="127.0.0.1",
                           help="address to bind (default 127.0.0.1: local only; any other address needs --api-key "
                                "or --insecure)")
            p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0 picks a free one)")
            p.add_argument("--api-key", default=os.environ.get("ZC_API_KEY"),
                           help="require 'Authorization: Bearer KEY' on /v1/* (default: $ZC_API_KEY; none: open, "
                                "which only a loopback --host allows without --insecure; an empty key is refused)")
            p.add_argument("--insecure", action="store_true",
                           help="allow a --host other than loopback (e.g. 0.0.0.0) without an API key: anyone who "
                                "can reach the address can then use the model (a trusted network only)")
            p.add_argument("--slots", type=_positive_int, default=8,
                           help="sequences decoded together in one batch (continuous batching; default 8)")
            p.add_argument("--queue", type=_positive_int, default=64,
                           help="requests allowed to wait for a slot; beyond it 429 with Retry-After (default 64)")
            p.add_argument("--max-tokens", type=_positive_int, default=512,
                           help="the largest max_tokens a request may ask for (default 512)")
            p.add_argument("--drain-timeout", type=float, default=30.0,
                           help="on SIGTERM, seconds running streams get to finish before they are cut (default 30)")
            p.add_argument("--body-timeout", type=_positive_float, default=10.0,
                           help="seconds a request's whole body may take to arrive; a slower one gets 408 and its "
                                "connection is closed (default 10)")
        if st.name == "plan":
            p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs in all (all nodes; default 1)")
            p.add_argument("--gpu", default="H100",
                           help="the card, as its name is written, e.g. H100, H200, A100, A40, 4090 (default H100): its "
                                "bf16 peak and memory come from the table the training loop's MFU uses")
            p.add_argument("--mfu", type=_checked(float, lambda v: 0 < v <= 1, "a number", "in (0, 1]"), default=0.4,
                           help="the model FLOPs utilization to assume (default 0.4: a tuned dense model of this size "
                                "reaches 0.35-0.5 on one node)")
            p.add_argument("--json", action="store_true", help="print the whole estimate as one JSON line instead")
        if st.name == "export":
            p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: transformers folder; gguf")
            p.add_argument("--out", type=Path, required=True, help="output folder (hf) or file (gguf)")
            p.add_argument("--gguf-type", choices=["f16", "f32"], default=None,
                           help="gguf weight type (default f16, llama.cpp's fast path; norms always f32; "
                                "f32 keeps the trained weights exactly)")
    return ap


def make_context(args: argparse.Namespace) -> Context:
    run_dir = args.run_dir or Path("runs") / (args.preset or config_mod.DEFAULT_PRESET)
    sources = {}
    if getattr(args, "sources", None):
        # absolute, so the saved config works from any directory; the stage key uses contents, not paths
        specs = []
        for spec in args.sources:
            fmt, sep, path = spec.partition(":")
            specs.append(f"{fmt}:{Path(path).expanduser().resolve()}" if sep and path else spec)
        sources[args.command if args.command in ("sft", "rm") else "data"] = specs
    cfg = config_mod.resolve(run_dir, args.preset, args.overrides, sources)
    skip = {"run_dir", "preset", "overrides", "force", "command", "sources", "until"}
    extra = {k: v for k, v in vars(args).items() if k not in skip}
    return Context(run_dir=RunDir(run_dir), cfg=cfg, force=getattr(args, "force", False), args=extra,
                   read_only=args.command in READ_ONLY)


def run_stage(ctx: Context, st: Stage) -> str:
    """Run one stage (under torchrun: on every rank if it is distributed, else on rank 0 while the
    others wait); returns 'not built' or what the stage did."""
    fn = st.load()
    if fn is None:
        ctx.outcomes[st.name] = {"action": "not built", "seconds": 0.0}
        return "not built"
    t0 = time.time()
    if "torch" in sys.modules:
        # every stage starts from the run's seed, so nothing it draws depends on what ran before it in this
        # process (under `run`, a resumed pipeline skips stages a fresh one trains)
        import torch  # lazy: ~1.5 s to import; `zero-chatgpt --help` and read-only commands start without it
        torch.manual_seed(ctx.cfg.run.seed)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # lazy: runtime imports torch (~1.5 s); `zero-chatgpt --help` and the read-only commands start without it
        from zero_chatgpt.core.runtime import run_under_torchrun  # lazy: see above
        run_under_torchrun(ctx, st.name, lambda: fn(ctx), everywhere=st.distributed)
    else:
        fn(ctx)
    rec = ctx.outcomes.setdefault(st.name, {"action": "ran"})
    rec["seconds"] = round(time.time() - t0, 1)
    if not ctx.read_only and st.name in STAGES and is_main_process():
        timings.record(ctx.run_dir, st.name, rec)      # after each stage: a stage run alone counts too
    return rec["action"]


_SAID = {"skip": "skipped (up to date)", "start": "ran", "rebuild": "rebuilt", "resume": "resumed",
         "continue": "continued (more steps)", "ran": "ran", "not built": "not built yet"}


def run_pipeline(ctx: Context, until: str | None) -> None:
    for st in PIPELINE:
        info(f"── {st.name}" + ("" if is_built(st) else ": not built yet in this version, skipped"))
        run_stage(ctx, st)
        if st.name == until:
            break
    rows = [[name, _SAID.get(o["action"], o["action"]), f"{o.get('seconds', 0.0):.1f}"]
            for name, o in ctx.outcomes.items()]
    table(["stage", "result", "time (s)"], rows, title=f"run: {ctx.run_dir.root}")
    _say_where_next(ctx)


def _say_where_next(ctx: Context) -> None:
    """The last lines of `run`: where the report is, and how to talk to the model."""

    rd = ctx.run_dir
    where = shlex.quote(str(rd.root))
    html = rd.report / "report.html"
    if "report" in ctx.outcomes and html.exists():
        info(f"report: {html}")
    else:
        info(f"report: not made by this run; make it with `zero-chatgpt report --run-dir {where}`")
    try:
        pick_model(rd, None, chat=True)
    except UserError:
        pre = (rd / "pretrain" / "final").is_dir()
        info(f"chat, serve: need an SFT model: `zero-chatgpt run --run-dir {where}`" +
             (f" (the pretrained model talks with `zero-chatgpt chat --run-dir {where} --stage pretrain`)" if pre else ""))
        return
    info(f"chat:   zero-chatgpt chat --run-dir {where}")
    info(f"serve:  zero-chatgpt serve --run-dir {where}")


def _dispatch(args, ctx: Context) -> None:
    if args.command == "run":
        run_pipeline(ctx, args.until)
        return
    st = STAGES.get(args.command) or TOOLS[args.command]
    if not is_built(st):
        raise UserError(f"'{args.command}' is not built yet in this version of zero-chatgpt")
    run_stage(ctx, st)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        ctx = make_context(args)
        if ctx.read_only:
            _dispatch(args, ctx)
        else:
            # one writer per run directory (rank 0 holds it for a torchrun job)
            writer = int(os.environ.get("RANK", "0")) == 0
            with RunLock(ctx.run_dir.root, args.command) if writer else contextlib.nullcontext():
                _dispatch(args, ctx)
                ctx.save_config()
    except UserError as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume where it stopped", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        if os.environ.get("ZC_DEBUG"):
            raise
        print(f"{_rank_prefix()}error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)


def _rank_prefix() -> str:
    """Under torchrun every process reports its own error; say which one it is."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


