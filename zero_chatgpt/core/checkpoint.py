"""The one checkpoint format, for every training stage.

    RUN_DIR/<stage>/step-N/   model.safetensors   the weights, named as transformers' LlamaForCausalLM
                              config.json         an HF LlamaConfig (so the folder loads in transformers)
                              <name>/             further models the stage trains (a PPO critic), each
                                                  model.safetensors + config.json
                              trainer_state.pt    per model: optimizer; step, every rank's RNG and data
                                                  position (torch.save of tensors and plain values only;
                                                  read back with weights_only=True)
                              meta.json           step, time, metrics (for people)
                              manifest.json       size and xxh3-128 of every file above, written last
    RUN_DIR/<stage>/final/    what chat / export / eval / a later stage read: the model, config.json,
                              meta.json, manifest.json (no optimizer: it is 2x the model and only a
                              resume needs it, from step-N). Its model file is a *copy* of the
                              checkpoint it was taken from (the last step-N, or the best one), verified
                              against that checkpoint's own manifest before final/'s manifest is written.
                              Not a hard link: a link shares the bytes, so one truncation or bad sector
                              damaged final/ and its only source together, and a rebuild then copied
                              the damage and vouched for it.

Atomic and verifiable: a checkpoint is written into `.tmp-<name>/`, every file fsync'ed, the
manifest last, and the folder renamed into place (a rename is atomic on POSIX). A run killed
mid-save leaves only a `.tmp-*` folder, which the next run deletes. On load the manifest is
checked (sizes and hashes): a truncated or damaged checkpoint is reported with its path and the
previous intact one is used; none left is a one-line error that offers --force. Older `step-*`
folders beyond the last K are deleted after a successful save only, so a failed save (a full
disk, a file size limit) always leaves the previous checkpoint loadable. Files are written with
plain `open()`, so their mode follows the umask.

`load_model(path)` reads our checkpoints and HF Llama folders alike (they are the same format):
model.safetensors, sharded safetensors (model.safetensors.index.json), or pytorch_model.bin
(loaded with weights_only=True); an HF folder has no manifest, and is read as it is.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from zero_chatgpt.core import manifest
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.model.transformer import ModelConfig, Transformer, rope_tables

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def stage_model_path(run_dir, stage: str) -> Path:
    """Where a stage's finished model lives: RUN_DIR/<stage>/final."""
    root = run_dir.root if hasattr(run_dir, "root") else Path(run_dir)
    return Path(root) / stage / "final"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # some filesystems do not allow fsync on a directory
        pass
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync `data` (an OSError names the path: ENOSPC, EFBIG, EROFS, EACCES...)."""
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None


def model_state_for_saving(model_state: dict, cfg: ModelConfig) -> dict:
    """Contiguous CPU tensors; with tied embeddings lm_head.weight is left out (as HF does;
    safetensors refuses two names for one storage)."""
    out = {}
    for k, v in model_state.items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        out[k] = v.detach().to("cpu").contiguous()
    return out


class NoIntactSource(UserError):
    """None of the checkpoints that hold the weights final/ should hold is intact."""


def model_hash(folder: Path) -> str | None:
    """The xxh3-128 of `folder`/model.safetensors as recorded when it was saved: by its own manifest, or for a
    model saved inside a checkpoint (step-N/ema/, a critic) by the checkpoint's (None without one)."""
    folder = Path(folder)
    for where, name in ((folder, MODEL_FILE), (folder.parent, f"{folder.name}/{MODEL_FILE}")):
        m = manifest.read(where)
        if m is not None:
            return (m.get("files") or {}).get(name, {}).get("xxh3_128")
    return None


def copy_verified(sources: list[Path], dest: Path) -> Path:
    """Copy model.safetensors into `dest` from the first of `sources` whose bytes match the hash its own
    manifest recorded when it was saved; return that source. The copy itself is hashed, so what lands in
    `dest` is exactly what was written at save time, never damage that happened since. A NoIntactSource
    names every source and what is wrong with it when none is intact."""
    why = []
    for src in sources:
        want = model_hash(src)
        if want is None:
            why.append(f"{src}: {'no manifest' if src.is_dir() else 'absent'}")
            continue
        try:
            shutil.copyfile(src / MODEL_FILE, dest / MODEL_FILE)
            got = manifest.file_hash(dest / MODEL_FILE)
        except FileNotFoundError:
            why.append(f"{src}: {MODEL_FILE} is missing")
            continue
        if got == want:
            return src
        why.append(f"{src}: {MODEL_FILE} is damaged (its hash differs from the one written)")
    (dest / MODEL_FILE).unlink(missing_ok=True)
    raise NoIntactSource("; ".join(why) or "no source given")


def write_model_files(folder: Path, model_state: dict, cfg: ModelConfig, dtype: torch.dtype | None = None,
                      copy_from: list[Path] | None = None) -> Path | None:
    """model.safetensors + config.json into `folder`. With `copy_from` (checkpoints holding the same
    weights, best first) the model file is a verified copy of the first intact one (copy_verified;
    `model_state` is then not needed), which is returned."""
    folder.mkdir(parents=True, exist_ok=True)
    source = None
    if copy_from is not None:
        source = copy_verified(copy_from, folder)
    else:
        state = model_state_for_saving(model_state, cfg)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        write_file(folder / MODEL_FILE, safetensors_bytes(state, metadata={"format": "pt"}))
    hf = cfg.to_hf_dict()
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).replace("torch.", "")
    write_file(folder / CONFIG_FILE, (json.dumps(hf, indent=2) + "\n").encode())
    return source


def save_checkpoint(stage_dir: str | os.PathLike, name: str, *, model_state: dict, cfg: ModelConfig,
                    trainer_state: dict | None = None, meta: dict | None = None, keep_last: int = 0,
                    extra_models: dict[str, tuple[dict, ModelConfig]] | None = None,
                    copy_from: list[Path] | None = None) -> Path:
    """Atomically write `stage_dir/name/` (e.g. "step-100" or "final"); return its path.

    Only the caller's rank 0 should call this. `extra_models` {name: (state, config)} go into
    subfolders. `keep_last` > 0 deletes older step-N folders beyond the newest K (never "final"),
    after the new one is in place. `copy_from`: take the model file from the first intact of these
    checkpoints (write_model_files) instead of `model_state`; meta.json then names it as `copied_from`.
    """
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        source = write_model_files(tmp, model_state, cfg, copy_from=copy_from)
    except NoIntactSource:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if source is not None:
        meta = {**(meta or {}), "copied_from": Path(os.path.relpath(source, stage_dir)).as_posix()}
    for sub, (state, sub_cfg) in (extra_models or {}).items():
        write_model_files(tmp / sub, state, sub_cfg)
    if trainer_state is not None:
        buf = io.BytesIO()
        torch.save(trainer_state, buf)
        write_file(tmp / STATE_FILE, buf.getvalue())
    write_file(tmp / META_FILE, (json.dumps({"name": name, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             **(meta or {})}, indent=2, default=float) + "\n").encode())
    files = [p.relative_to(tmp).as_posix() for p in sorted(tmp.rglob("*")) if p.is_file()]
    for sub in {Path(f).parent for f in files}:
        _fsync_dir(tmp / sub)
    manifest.write(tmp, manifest.describe(tmp, files))
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
    """step-N folders (complete or not: see latest_checkpoint), oldest first."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    found = []
    for p in stage_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """None if the step-N folder is complete and intact (manifest, sizes, hashes, a trainer state)."""
    why = manifest.problem(path)
    if why is None and not (path / STATE_FILE).exists():
        why = f"no {STATE_FILE} (not a resumable checkpoint)"
    return why


def latest_checkpoint(stage_dir: str | os.PathLike, report: bool = True, max_step: int | None = None) -> Path | None:
    """The newest intact step-N checkpoint (at or below max_step); damaged ones are reported and passed over.

    A UserError when there are checkpoints but none is intact (the only way on is --force)."""
    damaged = []
    ckpts = list_checkpoints(stage_dir)
    if max_step is not None:
        ckpts = [p for p in ckpts if int(p.name.split("-")[1]) <= max_step]
    for p in reversed(ckpts):
        why = checkpoint_problem(p)
        if why is None:
            if damaged and report:
                info(f"resuming from {p}, the newest intact checkpoint")
            return p
        damaged.append(f"{p.name}: {why}")
        if report:
            info(f"checkpoint {p} is damaged ({why}); passing over it")
    if damaged:
        raise UserError(f"no intact checkpoint in {stage_dir} ({'; '.join(damaged)}); rerun with --force to train "
                        f"this stage from the start")
    return None


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
    path = Path(ckpt) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path}: unreadable trainer state ({type(e).__name__}: {str(e)[:200]}); delete "
                        f"{Path(ckpt)} to resume from the checkpoint before it, or rerun with --force") from None


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
    try:
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
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
        raise UserError(f"{path}: unreadable weights ({type(e).__name__}: {str(e)[:200]}); the files are "
                        f"incomplete or damaged") from None
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


def empty_model(cfg: ModelConfig) -> Transformer:
    """A Transformer on the CPU with uninitialized weights (no random init: they are read from a file next),
    and its RoPE tables, which no file holds."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.max_position_embeddings)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer from a checkpoint folder (step-N/, final/) or an HF Llama folder."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such model folder; train the stage first (or give an HF Llama folder)")
    if manifest.read(path) is not None:      # ours: check it is whole (an HF folder has no manifest)
        why = manifest.problem(path)
        if why:
            raise UserError(f"{path}: damaged checkpoint ({why}); rerun its stage to rebuild it from its last "
                            f"checkpoint, or with --force to retrain it")
    cfg = read_model_config(path)
    model = empty_model(cfg)
    if cfg.tie_word_embeddings and cfg.head == "lm":
        model.lm_head.weight = model.model.embed_tokens.weight
    load_weights(model, path)
    return model.to(device=device, dtype=dtype).eval()
