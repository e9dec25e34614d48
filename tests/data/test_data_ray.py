"""The data stage on Ray: the same bytes as the local process pool, a killed worker retried, a
killed run resumed from its finished parts."""
import json
import os
import random

import pytest

try:
    import ray
except ImportError:
    if os.environ.get("CI") == "true":   # the dev extras install ray: in CI its absence is a failure
        raise
    pytest.skip("ray is not installed (pip install 'zero-chatgpt[ray]')", allow_module_level=True)

from test_data_pipeline import ctx_for, reviews  # noqa: E402

from zero_chatgpt.stages.data import run_stage  # noqa: E402


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    fault = tmp_path_factory.mktemp("fault")
    old = os.environ.get("ZC_DATA_FAULT_DIR")
    os.environ["ZC_DATA_FAULT_DIR"] = str(fault)     # the Ray workers inherit it (the test hook)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield fault
    ray.shutdown()
    if old is None:
        os.environ.pop("ZC_DATA_FAULT_DIR", None)
    else:
        os.environ["ZC_DATA_FAULT_DIR"] = old


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    texts = reviews(240)
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in texts]
    lines += [json.dumps({"text": texts[i]}, ensure_ascii=False) for i in range(15)]                      # exact copies
    lines += [json.dumps({"text": texts[i][:-3] + "，真的。"}, ensure_ascii=False) for i in range(15, 35)]  # near copies
    lines += ['{"text": "broken', json.dumps({"text": "太短了"}, ensure_ascii=False)]
    random.Random(0).shuffle(lines)
    src = d / "in.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return f"jsonl:{src}"


def _run(run_dir, source, *sets):
    ctx = ctx_for(run_dir, "data.shard_docs=50", "data.val_fraction=0.1", "data.workers=2", *sets, sources=[source])
    return run_stage(ctx)


def _outputs(run_dir):
    d = run_dir / "data"
    return {p.name: p.read_bytes() for p in sorted(d.glob("train-*.jsonl.zst")) + sorted(d.glob("val-*.jsonl.zst"))}


def _comparable(stats):
    return {k: v for k, v in stats.items() if k not in ("seconds", "part_commands", "resumed_parts")}


@pytest.fixture(scope="module")
def local(tmp_path_factory, source):
    run = tmp_path_factory.mktemp("local")
    stats = _run(run, source)
    return stats, _outputs(run)


@pytest.mark.slow
def test_ray_equals_local(ray_cluster, source, local, tmp_path):
    stats = _run(tmp_path, source, "data.executor=ray")
    assert stats["dropped"]["exact_dup"] >= 15 and stats["dropped"]["near_dup"] >= 10
    assert _comparable(stats) == _comparable(local[0])
    out = _outputs(tmp_path)
    assert out and out == local[1]
    on_disk = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert _comparable(on_disk) == _comparable(local[0])


@pytest.mark.slow
def test_killed_worker_is_retried(ray_cluster, source, local, tmp_path):
    # one worker killed in each kind of task: cleaning a part, exact dedup of a hash partition,
    # the candidates of a band group, gathering a part's texts and verifying a chunk of pairs
    names = ["part-1", "exact-0", "band-0", "gather-0", "verify-0"]
    for name in names:
        (ray_cluster / f"kill-{name}").write_text("")
    stats = _run(tmp_path, source, "data.executor=ray")
    for name in names:   # the first try died, and Ray ran the task again
        assert (ray_cluster / f"kill-{name}.fired").exists() and not (ray_cluster / f"kill-{name}").exists(), name
    assert _comparable(stats) == _comparable(local[0])
    assert _outputs(tmp_path) == local[1]


def test_ray_resumes_finished_parts(ray_cluster, source, local, tmp_path):
    # a run killed after cleaning two parts leaves them in work/; the Ray run reuses them
    from zero_chatgpt.stages import data as pipeline
    orig = pipeline.clean_part
    run = tmp_path / "run"
    ctx = ctx_for(run, "data.shard_docs=50", "data.val_fraction=0.1", "data.workers=1", sources=[source])
    # workers=1 runs inline: interrupt the local run after two parts, as a kill would
    class Killed(Exception):
        pass

    def dying(cfg, work, i, records, pid):
        if i >= 2:
            raise Killed
        return orig(cfg, work, i, records, pid)

    pipeline.clean_part = dying
    try:
        with pytest.raises(Killed):
            run_stage(ctx)
    finally:
        pipeline.clean_part = orig
    work = run / "data" / "work"
    assert sorted(p.name for p in work.glob("part-*.json")) == ["part-00000.json", "part-00001.json"]
    stats = _run(run, source, "data.executor=ray")
    assert [r["part"] for r in stats["resumed_parts"]] == [0, 1]
    assert _comparable(stats) == _comparable(local[0])
    assert _outputs(run) == local[1]


def test_missing_ray_is_a_user_error(monkeypatch):
    import sys

    from zero_chatgpt.core.errors import UserError
    from zero_chatgpt.data.executors import ray_executor
    monkeypatch.setitem(sys.modules, "ray", None)      # import ray raises ImportError
    with pytest.raises(UserError, match=r"pip install 'zero-chatgpt\[ray\]'"):
        with ray_executor("", 2):
            pass


def _tokenize(run_dir, source, *sets):
    from zero_chatgpt.stages.tokenizer import run_stage as tokenizer_stage
    tokenizer_stage(ctx_for(run_dir, "data.shard_docs=50", "data.val_fraction=0.1", "data.workers=2",
                            "tokenizer.vocab_size=600", *sets, sources=[source]))
    shards = {p.name: p.read_bytes() for p in sorted((run_dir / "tokens").glob("*.bin"))}
    manifest = json.loads((run_dir / "tokens" / "manifest.json").read_text())
    return shards, manifest, (run_dir / "tokenizer" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_tokenizer_encodes_shards_as_ray_tasks(ray_cluster, source, tmp_path, capfd):
    # under data.executor = "ray" each corpus shard is encoded by a Ray task; one is killed and retried
    # by Ray (a killed local pool worker would instead print that the pool failed and encode here)
    local_dir, ray_dir = tmp_path / "local", tmp_path / "ray"
    _run(local_dir, source)
    _run(ray_dir, source, "data.executor=ray")
    local = _tokenize(local_dir, source)
    (ray_cluster / "kill-encode-shard").write_text("")
    capfd.readouterr()
    on_ray = _tokenize(ray_dir, source, "data.executor=ray")
    assert (ray_cluster / "kill-encode-shard.fired").exists(), "no shard was encoded in a task"
    assert "worker processes failed" not in capfd.readouterr().err, "the shards were not encoded by Ray tasks"
    assert len(local[0]) >= 4 and on_ray[0] == local[0]
    assert on_ray[2] == local[2]
    strip = {"source_mtime_ns"}
    assert ({k: {f: v for f, v in r.items() if f not in strip} for k, r in on_ray[1]["shards"].items()}
            == {k: {f: v for f, v in r.items() if f not in strip} for k, r in local[1]["shards"].items()})
