"""`zero-chatgpt export --format hf --out P`: a folder transformers loads with no custom code.

Our checkpoints already *are* HF Llama folders (model.safetensors with LlamaForCausalLM
names + an HF config.json), so the export copies the weights, completes config.json with
the tokenizer's special ids, adds the tokenizer files (tokenizer.json,
tokenizer_config.json with the ChatML template, special_tokens_map.json) and a
generation_config.json whose eos ids stop at <|im_end|> and <|endoftext|>.
tests/export/test_export.py loads the result with AutoModelForCausalLM / AutoTokenizer and
checks logits (≤ 1e-4) and greedy generations against our model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.export.common import EXPORT_MARKER, TOKENIZER_FILES, generation_settings, replaceable
from zero_chatgpt.model.tokenizer import load_tokenizer


def export_hf(model_dir: Path, tokenizer_dir: Path, out: Path, sampling: dict | None = None) -> Path:
    """Write the HF folder `out`. `sampling`: the [chat] config section, written as generation_config.json
    so HF `generate` samples as `zero-chatgpt chat` does.

    Never deletes what export did not write: the folder is built beside `out` and moved into place,
    and only an empty `out` or an earlier export (unchanged, by its marker) is replaced."""
    out = Path(out)
    why = replaceable(out)
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
