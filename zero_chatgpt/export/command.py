"""`zero-chatgpt export --format hf --out P`: a folder transformers loads with no custom code.

Our checkpoints already *are* HF Llama folders (model.safetensors with LlamaForCausalLM
names + an HF config.json), so the export copies the weights, completes config.json with
the tokenizer's special ids, adds the tokenizer files (tokenizer.json,
tokenizer_config.json with the ChatML template, special_tokens_map.json) and a
generation_config.json whose eos ids stop at <|im_end|> and <|endoftext|>.
tests/test_export.py loads the result with AutoModelForCausalLM / AutoTokenizer and
checks logits (≤ 1e-4) and greedy generations against our model.

`--format gguf` (gguf_export.py) writes one file for llama.cpp instead, with the same safety: an
export replaces only what an earlier export wrote, known by its marker.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.console import UserError, info, table

def pick_stage(run_dir, stage: str | None) -> tuple[str, Path]:
    """The stage to export and its final/ folder (see rundir.pick_model), saying why later ones were passed over.

    Without --stage the pick must be a chat model (sft and after), as for `chat`: a pretrained model
    continues text instead of answering, and exporting one because a later model went missing would ship
    the wrong model without a word. It is exported when --stage names it."""
    from zero_chatgpt.core.rundir import pick_model
    from zero_chatgpt.core.registry import STAGES, model_stages
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


EXPORT_MARKER = ".zero-chatgpt-export.json"   # what an export wrote: names, sizes, hashes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "zero_chatgpt.json")


def file_marker(out: Path) -> str:
    """The marker of a one-file export (gguf), beside it: the file cannot hold its own hash."""
    return f".{out.name}{EXPORT_MARKER}"


def _replaceable(out: Path, file: bool = False) -> str | None:
    """None if `out` may be replaced by an export: absent, an empty folder, or a folder holding exactly
    what an earlier export wrote there (its marker lists every file, unchanged); with file=True, a file
    an earlier export wrote (the marker beside it lists it, unchanged). Else why not."""
    if not out.exists():
        # under a regular file nothing can be made (exists() says False there): say which file is in the way
        blocker = next((a for a in out.parents if a.exists() and not a.is_dir()), None)
        if blocker is not None:
            return (f"{blocker} is a file, so {out} cannot be made under it; nothing was changed: choose an --out "
                    f"that is not under a file")
        return None
    if file:
        if out.is_dir():
            return f"{out} is a folder; --format gguf writes one file: give --out a file path, e.g. {out / 'model.gguf'}"
        m = manifest.read(out.parent, file_marker(out))
        if m is None or list(m.get("files") or {}) != [out.name]:
            return (f"{out} exists and was not written by `zero-chatgpt export`; nothing was changed: choose a new "
                    f"--out file (or remove that one yourself)")
        changed = manifest.problem(out.parent, name=file_marker(out))
        if changed:
            return (f"{out} was written by `zero-chatgpt export` but changed since ({changed}); nothing was changed: "
                    f"choose a new --out file (or remove that one yourself)")
        return None
    if not out.is_dir():
        return f"{out} is a file, not a folder; give --out a new or empty folder"
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if not present and not any(out.iterdir()):
        return None
    m = manifest.read(out, EXPORT_MARKER)
    if m is None:
        return (f"{out} is not empty and was not written by `zero-chatgpt export` (it holds "
                f"{', '.join(present[:4])}{' ...' if len(present) > 4 else ''}); nothing was changed: choose a new "
                f"or empty --out folder")
    foreign = [p for p in present if p != EXPORT_MARKER and p not in m["files"]]
    changed = manifest.problem(out, name=EXPORT_MARKER)
    if foreign or changed:
        what = f"files export did not write: {', '.join(foreign[:4])}" if foreign else f"a file changed since: {changed}"
        return f"{out} holds an earlier export plus {what}; nothing was changed: choose a new or empty --out folder"
    return None


def generation_settings(sampling: dict | None) -> dict:
    """`zero-chatgpt chat`'s sampling ([chat] section over its defaults), which both formats record as the
    model's own defaults (generation_config.json; GGUF's general.sampling.* keys)."""
    return {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, **(sampling or {})}


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path, sampling: dict | None = None) -> Path:
    """Write the HF folder `out`. `sampling`: the [chat] config section, written as generation_config.json
    so HF `generate` samples as `zero-chatgpt chat` does.

    Never deletes what export did not write: the folder is built beside `out` and moved into place,
    and only an empty `out` or an earlier export (unchanged, by its marker) is replaced."""
    from zero_chatgpt.model.tokenizer import load_tokenizer
    out = Path(out)
    why = _replaceable(out)
    if why:
        raise UserError(why)
    tok = load_tokenizer(tokenizer_dir)
    cfg = json.loads((model_dir / ckpt.CONFIG_FILE).read_text())
    if cfg["vocab_size"] < tok.vocab_size:
        raise UserError(f"{model_dir}: model vocabulary {cfg['vocab_size']} < tokenizer's {tok.vocab_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-export-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        shutil.copyfile(model_dir / ckpt.MODEL_FILE, tmp / ckpt.MODEL_FILE)
        cfg.update(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id, bos_token_id=None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        c = generation_settings(sampling)
        gen = {"eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id, "do_sample": c["temperature"] > 0,
               **({k: c[k] for k in ("temperature", "top_k", "top_p")} if c["temperature"] > 0 else {}),
               "repetition_penalty": c["repetition_penalty"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name in TOKENIZER_FILES:     # what Tokenizer.save writes; never a leftover .tmp
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        names = [p.name for p in tmp.iterdir() if p.is_file()]
        manifest.write(tmp, manifest.describe(tmp, names), name=EXPORT_MARKER)
        if out.exists():       # empty, or our own earlier export: aside, then the new one in, then drop it
            old = out.with_name(f".{out.name}.old-export-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


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
        from zero_chatgpt.cli import os_error_line
        raise UserError("export failed: " + os_error_line(e, then="fix that and export again (the run directory "
                                                                 "is unchanged; no partial export is left)")) from None


def _export(ctx, fmt: str, stage: str, model_dir: Path, out: Path) -> None:
    if fmt == "gguf":
        from zero_chatgpt.export.gguf import DEFAULT_GGUF_TYPE, export_gguf
        kind = ctx.args.get("gguf_type") or DEFAULT_GGUF_TYPE
        name = f"zero-chatgpt {ctx.run_dir.root.resolve().name} {stage}"
        s = export_gguf(model_dir, ctx.run_dir.tokenizer, Path(out), name=name, gguf_type=kind,
                        sampling=ctx.cfg.get("chat"))
        info(f"exported {stage} model to {out}")
        table(["", "export"], [["stage", stage], ["format", f"gguf (llama, {kind}; norms f32)"], ["file", str(out)],
                               ["size (MB)", s["bytes"] / 1e6], ["parameters", s["params"]], ["tensors", s["tensors"]],
                               ["vocabulary", s["vocab"]],
                               ["embeddings", "tied (token_embd only)" if s["tied"] else "untied"],
                               ["run with", f"llama-cli -m {out}   |   llama-server -m {out}"]])
        return
    path = export_hf(model_dir, ctx.run_dir.tokenizer, Path(out), sampling=ctx.cfg.get("chat"))
    size = (path / ckpt.MODEL_FILE).stat().st_size
    info(f"exported {stage} model to {path}")
    table(["", "export"], [["stage", stage], ["format", "hf (LlamaForCausalLM)"], ["folder", str(path)],
                           ["weights (MB)", size / 1e6],
                           ["load with", "AutoModelForCausalLM.from_pretrained(folder)"]])
