"""bench/gpu.py: its CPU run ends in the JSON line the GPU run gives, and its MFU arithmetic."""
from __future__ import annotations

import json
import pytest
import math
import os
import subprocess
import sys
from pathlib import Path

from zero_chatgpt.core.runtime import gpu_peak_bf16

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_cpu_run_reports_speed_and_no_mfu():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--quick", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["device"].startswith("cpu") and res["mfu"] is None and res["peak_bf16_flops"] is None
    for key in ("tokens_per_s", "gen_tokens_per_s_b1", "gen_tokens_per_s_b32", "peak_mem_mb"):
        assert math.isfinite(res[key]) and res[key] > 0, key
    assert len(res["sample_token_ids"]) == 16
    assert "tokens/s" in r.stderr


def test_peak_table_and_flops_per_token():
    """The table and the formula bench/gpu.py (and the loop's MFU) use."""
    assert gpu_peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_bf16("NVIDIA H200") == 989e12
    assert gpu_peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_bf16("NVIDIA A40") == 150e12
    assert gpu_peak_bf16("Some New Accelerator") is None
    from zero_chatgpt.core import config
    from zero_chatgpt.model.transformer import model_config_from
    cfg = model_config_from(config.load_preset("seed-0.1b").model, 32006)
    d, i, layers, vocab = 512, 2752, 24, 32006
    # per layer: q k v o (16 heads, no grouping), gate/up/down, two RMSNorms; then the final norm and lm_head
    n = layers * (4 * d * d + 3 * d * i + 2 * d) + d + vocab * d
    # attention: 12 x layers x d x T, halved under the causal mask (the loop's MFU counts the same)
    assert cfg.flops_per_token(1024) == 6 * n + 12 * layers * d * 1024 / 2
