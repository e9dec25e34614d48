"""Where and how training runs: device, precision, the process group under torchrun, peak FLOP/s.

Shared by the training loop and by stages that only need a device or a rank (the generator,
eval, the data stages under torchrun).
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from zero_chatgpt.core.errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; start the process group (gloo on CPU, NCCL on GPU) once, and a
    gloo group beside it (cpu_group) for waits and Python objects."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("run.device = cuda but no CUDA device is available; use --set run.device=\"cpu\"")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(_teardown)
    if world > 1 and "cpu" not in _GROUPS:
        # Long: rank 0 may run the data stage for hours while the others wait in it.
        _GROUPS["cpu"] = dist.new_group(backend="gloo", timeout=timedelta(days=7))
    return Dist(rank, world, local, dev)


_GROUPS: dict = {}


def _teardown() -> None:
    """Destroy the process groups before the interpreter finalizes: gloo's threads still running then can
    abort the process ("terminate called without an active exception", exit -6) after the work is done."""
    try:
        if dist.is_initialized():
            _GROUPS.clear()
            dist.destroy_process_group()
    except Exception:   # noqa: BLE001 - leaving anyway; the work's outcome is already decided
        pass


def cpu_group():
    """The gloo group of setup_distributed (None in a single process)."""
    return _GROUPS.get("cpu")


def gather_to_all(obj, d: Dist) -> list:
    """Every rank's `obj` (plain values and CPU tensors), in rank order, on every rank."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def run_under_torchrun(ctx, name: str, fn, everywhere: bool) -> None:
    """Run stage `name` under torchrun: on every rank (a distributed stage) or on rank 0 alone while
    the others wait (data, tokenizer, eval, report: never N processes writing the same files). Then
    every rank learns whether it succeeded everywhere before any goes on to the next stage, so no rank
    reads a stage's output before rank 0 has finished recording it; a failure stops every rank with
    one line."""
    d = setup_distributed(ctx.cfg.run.device)
    failed, error = torch.zeros(1, dtype=torch.int64), None
    if everywhere or d.main:
        try:
            fn()
        except BaseException as e:   # noqa: BLE001 - re-raised below, after telling the others
            failed[0], error = 1, e
    dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=cpu_group())
    if error is not None:
        raise error
    if int(failed):
        raise UserError(f"{name} failed on {'another rank' if everywhere else 'rank 0'} (its message is above); "
                        f"this rank stops too")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 where it was measured to be faster, fp32 elsewhere.

    CUDA with bf16 support: bf16. CPU: bf16 where the CPU has bf16 instructions of its own (AMX tiles, or
    AVX512-BF16 dot products): there bf16 matmuls run 2-4x the fp32 rate, and the demo's training steps
    ran 1.2x faster end to end on an AVX-512-BF16 EPYC with the same losses (docs/experiments.md); on a
    CPU without them (AVX2, plain AVX-512) bf16 is converted in software and slower. Resolved on the
    machine that trains, from what it reports: the same machine always resolves alike, so resume is exact.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_amx() or cpu_has_bf16_dot() else "fp32"


def cpu_has_amx() -> bool:
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except Exception:
        return False


def cpu_has_bf16_dot() -> bool:
    """The CPU reports AVX512-BF16 (or AMX-BF16) in /proc/cpuinfo (Linux; elsewhere False: fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


_PEAK_CACHE: dict = {}


# Dense (no sparsity) bf16 tensor-core peak FLOP/s, from the vendors' data sheets: the one table behind the
# loop's MFU, bench/gpu.py and `zero-chatgpt plan`. The first name contained in the device's name wins, so the
# more specific names come first.
GPU_PEAK_BF16 = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("A10G", 70e12),
    ("A10", 125e12), ("A40", 150e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
    ("4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)


def gpu_peak_bf16(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by (part of) its name, e.g. "NVIDIA H100 80GB HBM3" or "A40"; None if unknown."""
    return next((f for n, f in GPU_PEAK_BF16 if n.lower() in device_name.lower()), None)


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s for the MFU estimate: datasheet dense figures for known GPUs (an unknown one counts as
    100 TFLOP/s); on CPU the theoretical vector peak (cpu_peak_flops)."""
    key = (device.type, precision)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if device.type == "cuda":
        peak = gpu_peak_bf16(torch.cuda.get_device_name(device)) or 100e12
        if precision == "fp32":
            peak /= 2   # TF32 tensor cores
    else:
        peak = cpu_peak_flops(precision)
    _PEAK_CACHE[key] = peak
    return peak


def cpu_peak_flops(precision: str) -> float:
    """Theoretical CPU peak: threads x clock x FLOPs per cycle per core (two FMA units of
    the widest vector ISA; AMX tiles for bf16). A measured matmul rate would be lower
    whenever other processes share the cores, and make MFU read above 100%."""
    mhz = 0.0
    try:
        with open("/proc/cpuinfo") as fh:
            mhz = max(float(line.split(":")[1]) for line in fh if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    cap = ""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:
        pass
    per_cycle = 64 if "AVX512" in cap else 32 if "AVX2" in cap else 16   # fp32: 2 FMA x lanes x 2
    if precision == "bf16":
        per_cycle = 1024 if "AMX" in cap else per_cycle * 2
    return torch.get_num_threads() * (mhz or 2000.0) * 1e6 * per_cycle


