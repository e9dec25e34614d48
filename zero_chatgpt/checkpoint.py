"""The one checkpoint format, for every training stage.

    RUN_DIR/<stage>/step-N/   model.safetensors   the weights, named as transformers' LlamaForCausalLM
                              config.json         an HF LlamaConfig (so the folder loads in transformers)
                              trainer_state.pt    optimizer, step, RNG states, data position (torch.save;
                                                  read back with weights_only=True)
                              meta.json           step, time, metrics (for people)
    RUN_DIR/<stage>/final/    the same, written when the stage finishes

Atomic: a checkpoint is written into `.tmp-step-N/`, every file fsync'ed, and the folder
renamed to `step-N/` (a rename is atomic on POSIX). A run killed mid-save leaves only a
`.tmp-*` folder, which the next run deletes; `latest_checkpoint` only ever sees complete
folders. Older `step-*` folders beyond the last K are deleted after a save.

`load_model(path)` reads our checkpoints and HF Llama folders alike (they are the same
format): model.safetensors, sharded safetensors (model.safetensors.index.json), or
pytorch_model.bin (loaded with weights_only=True).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zero_chatgpt.console import UserError
from zero_chatgpt.model import ModelConfig, Transformer, rope_tables

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def stage_model_path(run_dir, stage: str) -> Path:
    """Where a stage's finished model lives: RUN_DIR/<stage>/final."""
    root = run_dir.root if hasattr(run_dir, "root") else Path(run_dir)
    return Path(root) / stage / "final"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:   # some filesystems do not allow fsync on a directory
        pass


def model_state_for_saving(model_state: dict, cfg: ModelConfig) -> dict:
    """Contiguous CPU tensors; with tied embeddings lm_head.weight is left out (as HF does;
    safetensors refuses two names for one storage)."""
    out = {}
    for k, v in model_state.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


def write_model_files(folder: Path, model_state: dict, cfg: ModelConfig, dtype: torch.dtype | None = None) -> None:
    state = model_state_for_saving(model_state, cfg)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(folder / MODEL_FILE), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
    (folder / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")


def save_checkpoint(stage_dir: str | os.PathLike, name: str, *, model_state: dict, cfg: ModelConfig,
                    trainer_state: dict | None = None, meta: dict | None = None, keep_last: int = 0) -> Path:
    """Atomically write `stage_dir/name/` (e.g. "step-100" or "final"); return its path.

    Only the caller's rank 0 should call this. `keep_last` > 0 deletes older step-N folders
    beyond the newest K (never "final").
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_model_files(tmp, model_state, cfg)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({"name": name, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             **(meta or {})}, indent=2, default=float) + "\n")
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    final = stage_dir / name
    if final.exists():   # replace: move the old one aside first (a rename cannot replace a non-empty dir)
        trash = stage_dir / f".old-{name}"
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    _fsync_dir(stage_dir)
    if keep_last > 0:
        for old in list_checkpoints(stage_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(stage_dir: str | os.PathLike) -> list[Path]:
    """Complete step-N folders, oldest first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = []
    for p in stage_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / MODEL_FILE).exists() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(stage_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(stage_dir)
    return ckpts[-1] if ckpts else None


def clean_partial(stage_dir: str | os.PathLike) -> list[Path]:
    """Delete what a killed save left behind (.tmp-*), and restore a final/ whose replacement
    was interrupted between its two renames (.old-final without final)."""
    stage_dir = Path(stage_dir)
    removed = []
    if not stage_dir.is_dir():
        return removed
    for p in stage_dir.iterdir():
        if p.name.startswith(".tmp-"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.name.startswith(".old-"):
            target = stage_dir / p.name[len(".old-"):]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, target)
            removed.append(p)
    return removed


def load_trainer_state(ckpt: str | os.PathLike) -> dict:
    return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise UserError(f"{path}: no {CONFIG_FILE}; expected a zero-chatgpt checkpoint or an HF Llama folder")
    try:
        return ModelConfig.from_hf_dict(json.loads(cfg_path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: not a supported Llama config: {e}") from None


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint / HF folder, as a state dict of CPU tensors."""
    path = Path(path)
    if (path / MODEL_FILE).exists():
        return load_file(str(path / MODEL_FILE))
    index = path / "model.safetensors.index.json"
    if index.exists():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(path / shard)))
        return state
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no {MODEL_FILE}, model.safetensors.index.json or pytorch_model.bin")


def load_weights(model: Transformer, path: str | os.PathLike) -> None:
    """Copy the weights at `path` into `model` (shapes must match), checking every name."""
    state = read_model_state(path)
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer from a checkpoint folder (step-N/, final/) or an HF Llama folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder; train the stage first (or give an HF Llama folder)")
    cfg = read_model_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    cos, sin = rope_tables(cfg, cfg.max_position_embeddings)   # buffers are not in the file
    model.rope_cos, model.rope_sin = cos, sin
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, path)
    return model.to(device=device, dtype=dtype).eval()
