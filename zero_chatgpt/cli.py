"""The `zero-chatgpt` command: one subcommand per stage, plus `run` for the whole recipe.

Every subcommand takes --run-dir, --preset and --set; stage-specific flags are
documented in each subcommand's --help.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from zero_chatgpt import config as config_mod
from zero_chatgpt.console import UserError, info
from zero_chatgpt.rundir import Context, RunDir

# The recipe, in order. Each stage is `module:function(ctx)`.
STAGES = {
    "data": ("zero_chatgpt.data.pipeline", "run_stage", "clean and deduplicate the corpus into RUN_DIR/data"),
    "tokenizer": ("zero_chatgpt.tokenizer", "run_stage", "train the BPE tokenizer and encode RUN_DIR/tokens"),
    "pretrain": ("zero_chatgpt.train.pretrain", "run_stage", "pretrain the language model"),
    "sft": ("zero_chatgpt.train.sft", "run_stage", "build instruction data and fine-tune (SFT)"),
    "rm": ("zero_chatgpt.train.reward", "run_stage", "train the reward model"),
    "ppo": ("zero_chatgpt.train.ppo", "run_stage", "align with PPO against the reward model"),
    "dpo": ("zero_chatgpt.train.dpo", "run_stage", "align with DPO on preference pairs"),
    "grpo": ("zero_chatgpt.train.grpo", "run_stage", "align with GRPO"),
    "eval": ("zero_chatgpt.evaluate", "run_stage", "evaluate every trained stage on held-out prompts"),
    "report": ("zero_chatgpt.report", "run_stage", "write report.md / report.html with plots"),
}
# Commands that use a run but are not part of `run`.
TOOLS = {
    "chat": ("zero_chatgpt.chat", "run_command", "chat with a trained model in the terminal (streams tokens)"),
    "serve": ("zero_chatgpt.serve.app", "run_command", "serve an OpenAI-compatible API and a web chat page"),
    "export": ("zero_chatgpt.export", "run_command", "export a trained model (hf | gguf)"),
}


def _load(module: str, func: str):
    """The stage function, or None when that stage is not built yet."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module or module.startswith(str(e.name) + "."):
            return None
        raise
    return getattr(mod, func, None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="runs/demo", type=Path,
                   help="run directory every stage reads and writes (default: runs/demo)")
    p.add_argument("--preset", default=None,
                   help=f"config preset ({', '.join(config_mod.preset_names())}); default: the run's saved "
                        "config.toml, else demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.lr=3e-4 (repeatable)")
    p.add_argument("--force", action="store_true", help="rebuild even if the stage's output is up to date")


def _sources(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--source", dest="sources", action="append", default=[], metavar="FORMAT:PATH",
                   help=f"{what} (repeatable). FORMAT is a reader: text, jsonl, parquet, wikipedia-cn, "
                        "baidubaike, skypile, firefly, ruozhiba, sharegpt, prompt-answer, messages, preference")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="zero-chatgpt", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole recipe, stage after stage (skips stages that are up to date)")
    _common(p)
    p.add_argument("--until", choices=list(STAGES), default=None, help="stop after this stage")

    for name, (_, _, help_) in {**STAGES, **TOOLS}.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        if name == "data":
            _sources(p, "pretraining text to read instead of the built-in corpus")
        if name == "sft":
            _sources(p, "instruction data to read instead of the built-in instructions")
        if name in ("eval",):
            p.add_argument("--stage", default=None,
                           help="evaluate only this stage (pretrain, sft, ppo, dpo, grpo); default: all trained")
        if name in ("chat", "serve"):
            p.add_argument("--stage", default=None,
                           help="which trained model to load (pretrain, sft, ppo, dpo, grpo); default: the latest")
        if name == "chat":
            p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
        if name == "serve":
            p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: local only)")
            p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
        if name == "export":
            p.add_argument("--format", choices=["hf", "gguf"], default="hf", help="hf: transformers folder; gguf")
            p.add_argument("--out", type=Path, required=True, help="output folder or file")
            p.add_argument("--stage", default=None, help="which trained model to export; default: the latest")
    return ap


def make_context(args: argparse.Namespace) -> Context:
    run_dir = RunDir(args.run_dir)
    cfg = config_mod.resolve(run_dir.root, args.preset, args.overrides)
    extra = {k: v for k, v in vars(args).items() if k not in ("run_dir", "preset", "overrides", "force", "command")}
    if extra.get("sources"):
        section = "sft" if args.command == "sft" else "data"
        cfg[section]["sources"] = list(extra["sources"])
    return Context(run_dir=run_dir, cfg=cfg, force=args.force, args=extra)


def run_pipeline(ctx: Context, until: str | None) -> None:
    built, missing = [], []
    for name, (module, func, _) in STAGES.items():
        fn = _load(module, func)
        if fn is None:
            info(f"── {name}: not built yet, skipped")
            missing.append(name)
        else:
            info(f"── {name}")
            fn(ctx)
            built.append(name)
        if name == until:
            break
    info(f"done: {', '.join(built) or 'nothing'} ran" + (f"; not built yet: {', '.join(missing)}" if missing else ""))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        ctx = make_context(args)
        if args.command == "run":
            run_pipeline(ctx, args.until)
            return
        module, func, _ = {**STAGES, **TOOLS}[args.command]
        fn = _load(module, func)
        if fn is None:
            raise UserError(f"'{args.command}' is not built yet in this version of zero-chatgpt")
        fn(ctx)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
