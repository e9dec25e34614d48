"""bench/rehearse.py --quick runs every command it rehearses (small model, tiny sizes) to its end: the stages it
measures, a kill -9 and resume, and no wall (a stage that failed)."""
import json
import pytest
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_quick_rehearsal_runs_to_its_end_without_a_wall():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearse.py"), "--quick"], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["walls"] == [], res["walls"]
    st = res["stages"]
    assert len(st["data"]) == 3 and all(v["docs_out"] > 0 and v["exact_dup"] > 0 for v in st["data"].values())
    assert st["tokenizer"]["tokens"] > 0 and st["tokenizer"]["hf_tokenizers_train"]["rc"] == 0
    assert st["pretrain"]["killed_at_step_1"] and st["pretrain"]["resumed"] and st["pretrain"]["checkpoint_intact"]
    assert st["sft"]["train"]["steps"] == 2 and st["export"]["hf"]["ok"]
    assert res["extrapolated"]["data"]["hours_this_machine"] >= 0 and res["extrapolated"]["sft_builder"]["records"]
