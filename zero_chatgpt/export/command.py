"""`zero-chatgpt export --format hf|gguf --out P`: picks the run's model (a chat model unless --stage
names another), checks it, and writes it with export/hf.py or export/gguf.py. An export replaces only what
an earlier export wrote, known by its marker (export/common.py)."""
from __future__ import annotations

import os
from pathlib import Path

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.console import info, table
from zero_chatgpt.core.errors import UserError, os_error_line
from zero_chatgpt.core.registry import STAGES, model_stages
from zero_chatgpt.core.rundir import pick_model
from zero_chatgpt.export.gguf import DEFAULT_GGUF_TYPE, export_gguf
from zero_chatgpt.export.hf import export_hf


def pick_stage(run_dir, stage: str | None) -> tuple[str, Path]:
    """The stage to export and its final/ folder (see rundir.pick_model), saying why later ones were passed over.

    Without --stage the pick must be a chat model (sft and after), as for `chat`: a pretrained model
    continues text instead of answering, and exporting one because a later model went missing would ship
    the wrong model without a word. It is exported when --stage names it."""
    name, path, notes = pick_model(run_dir, stage, chat=False)
    if stage is None and not STAGES[name].chat:
        chats = ", ".join(s.name for s in model_stages(chat_only=True))
        raise UserError(f"nothing exported: the newest current model in {run_dir.root} is {name}, not a chat model "
                        f"({chats})" + (f"; {'; '.join(notes)}" if notes else "") + f". To export the {name} model "
                        f"anyway, name it: --stage {name}; for a chat model, run `zero-chatgpt sft --run-dir "
                        f"{run_dir.root}` first")
    for n in notes:
        info(n)
    return name, path


def run_command(ctx) -> None:
    fmt = ctx.args.get("format", "hf")
    out = ctx.args.get("out")
    if out is None:
        raise UserError("export needs --out PATH")
    stage, model_dir = pick_stage(ctx.run_dir, ctx.args.get("stage"))
    damaged = manifest.problem(model_dir) if manifest.read(model_dir) is not None else None
    if damaged:
        raise UserError(f"{model_dir}: damaged checkpoint ({damaged}); rerun `zero-chatgpt {stage} --run-dir "
                        f"{ctx.run_dir.root}` to rebuild it from its last checkpoint")
    if not ctx.run_dir.tokenizer.is_dir():
        raise UserError(f"no tokenizer in {ctx.run_dir.tokenizer}; run `zero-chatgpt tokenizer` first")
    try:
        _export(ctx, fmt, stage, model_dir, Path(out))
    except OSError as e:
        # the CLI's generic line promises kept checkpoints, which means nothing here: an export only reads
        # the run directory, and it removes its own half-written copy
        if os.environ.get("ZC_DEBUG"):
            raise
        raise UserError("export failed: " + os_error_line(e, then="fix that and export again (the run directory "
                                                                 "is unchanged; no partial export is left)")) from None


def _export(ctx, fmt: str, stage: str, model_dir: Path, out: Path) -> None:
    if fmt == "gguf":
        kind = ctx.args.get("gguf_type") or DEFAULT_GGUF_TYPE
        name = f"zero-chatgpt {ctx.run_dir.root.resolve().name} {stage}"
        s = export_gguf(model_dir, ctx.run_dir.tokenizer, Path(out), name=name, gguf_type=kind,
                        sampling=ctx.cfg.chat)
        info(f"exported {stage} model to {out}")
        table(["", "export"], [["stage", stage], ["format", f"gguf (llama, {kind}; norms f32)"], ["file", str(out)],
                               ["size (MB)", s["bytes"] / 1e6], ["parameters", s["params"]], ["tensors", s["tensors"]],
                               ["vocabulary", s["vocab"]],
                               ["embeddings", "tied (token_embd only)" if s["tied"] else "untied"],
                               ["run with", f"llama-cli -m {out}   |   llama-server -m {out}"]])
        return
    path = export_hf(model_dir, ctx.run_dir.tokenizer, Path(out), sampling=ctx.cfg.chat)
    size = (path / ckpt.MODEL_FILE).stat().st_size
    info(f"exported {stage} model to {path}")
    table(["", "export"], [["stage", stage], ["format", "hf (LlamaForCausalLM)"], ["folder", str(path)],
                           ["weights (MB)", size / 1e6],
                           ["load with", "AutoModelForCausalLM.from_pretrained(folder)"]])
