"""`zero-chatgpt export --format hf --out P`: a folder transformers loads with no custom code.

Our checkpoints already *are* HF Llama folders (model.safetensors with LlamaForCausalLM
names + an HF config.json), so the export copies the weights, completes config.json with
the tokenizer's special ids, adds the tokenizer files (tokenizer.json,
tokenizer_config.json with the ChatML template, special_tokens_map.json) and a
generation_config.json whose eos ids stop at <|im_end|> and <|endoftext|>.
tests/test_export.py loads the result with AutoModelForCausalLM / AutoTokenizer and
checks logits (≤ 1e-4) and greedy generations against our model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zero_chatgpt import checkpoint as ckpt
from zero_chatgpt.console import UserError, info, table

def pick_stage(run_dir, stage: str | None) -> tuple[str, Path]:
    """The stage to export and its final/ folder (see rundir.pick_model), saying why later ones were passed over."""
    from zero_chatgpt.rundir import pick_model
    name, path, notes = pick_model(run_dir, stage, chat=False)
    for n in notes:
        info(n)
    return name, path


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path, sampling: dict | None = None) -> Path:
    """Write the HF folder `out` (replaced atomically if it is a previous export). `sampling`: the [chat]
    config section, written as generation_config.json so HF `generate` samples as `zero-chatgpt chat` does."""
    from zero_chatgpt.tokenizer import load_tokenizer
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UserError(f"{out} exists and is not an exported model; choose an empty or new --out folder")
    tok = load_tokenizer(tokenizer_dir)
    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shutil.copy2(model_dir / ckpt.MODEL_FILE, tmp / ckpt.MODEL_FILE)
    cfg = json.loads((model_dir / ckpt.CONFIG_FILE).read_text())
    cfg.update(eos_token_id=tok.eot_id, pad_token_id=tok.pad_id, bos_token_id=None)
    if cfg["vocab_size"] < tok.vocab_size:
        raise UserError(f"{model_dir}: model vocabulary {cfg['vocab_size']} < tokenizer's {tok.vocab_size}")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    c = {"temperature": 0.7, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.1, **(sampling or {})}
    gen = {"eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id, "do_sample": c["temperature"] > 0,
           **({k: c[k] for k in ("temperature", "top_k", "top_p")} if c["temperature"] > 0 else {}),
           "repetition_penalty": c["repetition_penalty"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def run_command(ctx) -> None:
    fmt = ctx.args.get("format", "hf")
    out = ctx.args.get("out")
    if out is None:
        raise UserError("export needs --out PATH")
    stage, model_dir = pick_stage(ctx.run_dir, ctx.args.get("stage"))
    if fmt == "gguf":
        raise UserError("--format gguf is not built yet; export with --format hf and convert that folder with "
                        "llama.cpp's convert_hf_to_gguf.py")
    if not ctx.run_dir.tokenizer.is_dir():
        raise UserError(f"no tokenizer in {ctx.run_dir.tokenizer}; run `zero-chatgpt tokenizer` first")
    path = export_hf(model_dir, ctx.run_dir.tokenizer, Path(out), sampling=ctx.cfg.get("chat"))
    size = (path / ckpt.MODEL_FILE).stat().st_size
    info(f"exported {stage} model to {path}")
    table(["", "export"], [["stage", stage], ["format", "hf (LlamaForCausalLM)"], ["folder", str(path)],
                           ["weights (MB)", size / 1e6],
                           ["load with", "AutoModelForCausalLM.from_pretrained(folder)"]])
