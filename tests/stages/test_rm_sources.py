"""`zero-chatgpt rm --source preference:FILE`, as the README documents it, on the toy run: the pairs come from
the file (remembered in config.toml like sft's --source), its bad lines are skipped with file:line samples in
the summary, and the summary's shares on few items carry their n."""
import json

import pytest
import torch

from test_sft import TOY, toy_run_copy
from zero_chatgpt.cli import main

TINY_RM = ["rm.max_steps=2", "rm.batch_pairs=4", "rm.micro_batch_pairs=4", "rm.eval_every=0", "rm.checkpoint_every=0",
           "rm.tensorboard=false", "rm.precision=\"fp32\"", "rm.val_fraction=0.5", "rm.warmup_steps=0",
           "rl.max_new_tokens=4"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pairs_file(path):
    """24 good {prompt, chosen, rejected} lines and three bad ones, at lines 4, 8 and 10."""
    lines = [json.dumps({"prompt": f"{k}是什么？" + "？" * i, "chosen": v, "rejected": "不知道"},
                        ensure_ascii=False).encode() for i in range(3) for k, v in TOY.items()]
    lines.insert(3, b'{"prompt": "x", "chosen": "y"}')
    lines.insert(7, b'{not json')
    lines.insert(9, b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_rm_reads_preference_pairs_from_source(tmp_path, tmp_path_factory, capsys, monkeypatch, one_thread):
    monkeypatch.setenv("ZC_NO_PROGRESS", "1")
    rd = tmp_path / "run"
    toy_run_copy(rd, tmp_path_factory)
    src = _pairs_file(tmp_path / "pairs.jsonl")
    main(["rm", "--run-dir", str(rd), "--source", f"preference:{src}", *sum((["--set", x] for x in TINY_RM), [])])
    err = capsys.readouterr().err
    assert f'sources = ["preference:{src}"]' in (rd / "config.toml").read_text()       # remembered, as sft's
    train = [json.loads(x) for x in (rd / "rm_data" / "train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (rd / "rm_data" / "val.jsonl").read_text().splitlines()]
    assert len(train) + len(val) == 24 and {p["negative"] for p in train} == {"source"}
    # the bad lines: counted, and the first ones named by file:line, in the first line and the summary table
    assert f"24 pairs from preference:{src} (3 bad records skipped, e.g. {src}:4: missing field 'rejected'" in err
    table = err[err.index("rm: done"):]
    assert "bad source records (skipped)" in table
    for line in (4, 8, 10):
        assert f"{src}:{line}: " in table, line
    # every share in the summary is on fewer than 30 items here: each shows its n
    res = json.loads((rd / "eval" / "rm.json").read_text())
    assert res["val_pairs"] == len(val) < 30 and f"{res['accuracy']:.3f} (n={len(val)})" in table
    assert res["pairs_by_negative"] == {"source": len(val)}
    ga = next(x for x in table.splitlines() if "gold_agreement" in x)
    if res["gold_agreement"] is None:
        assert "-" in ga
    else:       # a share from fewer than 30 pairs carries its n, a larger one does not need to
        n = res["gold_pairs"]
        assert f"{res['gold_agreement']:.3f}" + (f" (n={n})" if n < 30 else "") + " " in ga + " "
    # a second command needs no --source: the run remembers it, and the pairs are current
    main(["rm", "--run-dir", str(rd)])
    assert "up to date" in capsys.readouterr().err


def test_rm_source_must_be_preference_pairs(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["rm", "--run-dir", str(tmp_path), "--source", f"jsonl:{tmp_path / 'x.jsonl'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "'rm.sources'" in err and "preference:PATH strings" in err
