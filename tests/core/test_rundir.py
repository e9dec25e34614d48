"""The run directory loses nothing: remembered sources, keys of result values only, refusal instead of
silent retraining, continuing with more steps, the newest current model, one writer, read-only readers."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from runs import previous_version, record_stage, tiny_args, write_sources, zc
from zero_chatgpt.cli import main
from zero_chatgpt.core import config
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.rundir import RunDir, pick_model, read_marker


def cli(capsys, *args):
    """zero-chatgpt ARGS in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    """A finished tiny pipeline (data → sft) built once; tests work on copies."""
    root = tmp_path_factory.mktemp("rundir_master")
    corpus, chat = write_sources(root / "src")
    r = zc("run", "--run-dir", root / "run", "--until", "sft", *tiny_args(),
           "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]')
    assert r.returncode == 0, r.stderr[-3000:]
    return root


@pytest.fixture
def run(master, tmp_path, monkeypatch):
    """A copy of the tiny run with its own copy of the sources (so a test may edit them)."""
    monkeypatch.setenv("ZC_NO_PROGRESS", "1")
    shutil.copytree(master / "src", tmp_path / "src")
    shutil.copytree(master / "run", tmp_path / "run")
    cfg = (tmp_path / "run" / "config.toml").read_text().replace(str(master / "src"), str(tmp_path / "src"))
    (tmp_path / "run" / "config.toml").write_text(cfg)
    return tmp_path / "run"


def tree(root):
    """{relative path: (size, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_sources_are_remembered_and_keyed_by_content(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZC_NO_PROGRESS", "1")
    corpus, _ = write_sources(tmp_path / "src")
    d = tmp_path / "run"
    code, err = cli(capsys, "data", "--run-dir", d, "--source", f"jsonl:{corpus}", *tiny_args())
    assert code == 0, err
    saved = config.resolve(d, None, [])
    assert saved.data.sources == [f"jsonl:{corpus.resolve()}"]       # remembered, absolute
    shards = tree(d / "data")
    # later commands need no --source: the same input, up to date (before: the built-in corpus, rebuilt)
    code, err = cli(capsys, "data", "--run-dir", d)
    assert code == 0 and "data: up to date" in err
    # the same content elsewhere, touched: still the same input (the key holds contents, not paths or mtimes)
    moved = tmp_path / "elsewhere" / "corpus.jsonl"
    moved.parent.mkdir()
    shutil.copyfile(corpus, moved)
    os.utime(corpus, (time.time() + 100, time.time() + 100))
    code, err = cli(capsys, "data", "--run-dir", d, "--source", f"jsonl:{moved}")
    assert code == 0 and "data: up to date" in err
    assert tree(d / "data") == shards
    # changed content is a change like any other: rebuilt, saying why
    with open(moved, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": "新的一篇文章，" * 20}, ensure_ascii=False) + "\n")
    code, err = cli(capsys, "data", "--run-dir", d)
    assert code == 0 and "data: rebuilding (data.sources" in err
    assert json.loads((d / "data" / "stats.json").read_text())["docs_in"] == 2401


@pytest.mark.slow
def test_operational_keys_never_make_a_stage_stale(run, capsys):
    before = {s: tree(run / s) for s in ("data", "tokenizer", "tokens", "pretrain", "sft")}
    code, err = cli(capsys, "run", "--run-dir", run, "--until", "sft", "--set", "pretrain.log_every=3",
                    "--set", "data.workers=1", "--set", "tokenizer.num_threads=2", "--set", 'run.device="cpu"',
                    "--set", "pretrain.checkpoint_every=2", "--set", "sft.eval_every=1", "--set", "pretrain.compile=true",
                    "--set", "sft.keep_last=5", "--set", "pretrain.tensorboard=true", "--set", "data.drop_samples=1")
    assert code == 0, err
    for stage in ("data", "tokenizer", "pretrain", "sft"):
        assert f"{stage}: up to date" in err
    assert "starting over" not in err and "deleting" not in err
    assert {s: tree(run / s) for s in before} == before
    assert err.count("skipped (up to date)") == 4         # run's summary says what it did


@pytest.mark.slow
def test_changed_inputs_of_a_trained_stage_refuse_with_the_keys(run, capsys):
    saved = (run / "config.toml").read_text()
    ckpts = tree(run / "pretrain")
    code, err = cli(capsys, "pretrain", "--run-dir", run, "--set", "pretrain.lr=0.01")
    assert code == 2 and err.count("\n") == 1
    assert "pretrain.lr 0.0025 → 0.01" in err and "--force" in err and "max_steps" in err
    assert tree(run / "pretrain") == ckpts                  # nothing deleted
    assert (run / "config.toml").read_text() == saved      # a refused command saves nothing
    # a data or tokenizer change would replace what pretrain and sft were trained on: refused too
    code, err = cli(capsys, "data", "--run-dir", run, "--set", "data.min_chars=40")
    assert code == 2 and "data: its inputs changed (data.min_chars 30 → 40), but pretrain, sft were trained" in err
    code, err = cli(capsys, "tokenizer", "--run-dir", run, "--set", "tokenizer.vocab_size=600")
    assert code == 2 and "pretrain, sft were trained on its current output" in err
    assert tree(run / "pretrain") == ckpts and (run / "config.toml").read_text() == saved
    # rebuilt anyway (--force): the trained stages then name the upstream key that changed
    code, err = cli(capsys, "data", "--run-dir", run, "--set", "data.min_chars=40", "--force")
    assert code == 0, err
    code, err = cli(capsys, "tokenizer", "--run-dir", run, "--force")
    assert code == 0, err
    code, err = cli(capsys, "pretrain", "--run-dir", run)
    assert code == 2 and "data.min_chars 30 → 40" in err and tree(run / "pretrain") == ckpts
    # --force retrains it
    code, err = cli(capsys, "pretrain", "--run-dir", run, "--force")
    assert code == 0 and "--force: deleting" in err
    assert read_marker(run / "pretrain")["closure"]["data"]["data.min_chars"] == 40


def test_an_attempt_that_trained_nothing_is_no_reason_to_refuse(run, capsys):
    marker = run / "pretrain" / ".stage.json"
    rec = json.loads(marker.read_text())
    shutil.rmtree(run / "pretrain")
    (run / "pretrain").mkdir()
    rec["closure"]["pretrain"]["pretrain.lr"] = 0.5                 # killed at step 0 with other inputs
    marker.write_text(json.dumps({**rec, "state": "running", "key": "0123456789abcdef"}))
    code, err = cli(capsys, "pretrain", "--run-dir", run)
    assert code == 0 and "trained from other inputs" not in err, err


def test_a_deleted_source_does_not_block_a_finished_run(run, capsys):
    (run.parent / "src" / "corpus.jsonl").unlink()
    (run.parent / "src" / "chat.jsonl").unlink()
    code, err = cli(capsys, "run", "--run-dir", run, "--until", "sft")
    assert code == 0, err
    assert "does not exist; keeping what was built from it" in err and err.count("skipped (up to date)") == 4


def test_raising_max_steps_continues_from_the_last_checkpoint(run, capsys):
    code, err = cli(capsys, "pretrain", "--run-dir", run, "--set", "pretrain.max_steps=16")
    assert code == 0, err
    assert "continuing from its last checkpoint (pretrain.max_steps 12 → 16)" in err and "(step 12)" in err
    recs = [json.loads(x) for x in (run / "logs" / "pretrain.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert sorted(train) == list(range(1, 17))              # one run: steps 1..12, then 13..16
    # the added steps keep the first run's schedule, at its floor (lr x min_lr_ratio), not back up the curve
    assert all(abs(train[s]["lr"] - 0.0025 * 0.1) < 1e-12 for s in range(13, 17))
    assert json.loads((run / "pretrain" / "final" / "meta.json").read_text())["step"] == 16
    assert read_marker(run / "pretrain")["closure"]["pretrain"]["pretrain.schedule_steps"] == 12
    code, err = cli(capsys, "pretrain", "--run-dir", run)      # up to date as continued
    assert code == 0 and "pretrain: up to date" in err
    # SFT was trained on the 12-step model: it is not silently retrained
    code, err = cli(capsys, "sft", "--run-dir", run)
    assert code == 2 and "pretrain.max_steps 12 → 16" in err
    # lowering max_steps below what was trained is refused too
    code, err = cli(capsys, "pretrain", "--run-dir", run, "--set", "pretrain.max_steps=8")
    assert code == 2 and "pretrain.max_steps 16 → 8" in err


def test_an_edited_sft_source_is_noticed(run, capsys):
    chat = run.parent / "src" / "chat.jsonl"
    code, err = cli(capsys, "sft", "--run-dir", run)
    assert code == 0 and "sft: up to date" in err
    lines = chat.read_text(encoding="utf-8").splitlines()
    chat.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    code, err = cli(capsys, "sft", "--run-dir", run)
    assert code == 2 and "sft.sources" in err and "--force" in err


@pytest.mark.slow
def test_latest_model_is_the_newest_current_one(run, capsys):
    # a later stage trained on this SFT model (the registry's grpo reads sft)
    shutil.copytree(run / "sft" / "final", run / "grpo" / "final")
    record_stage(run, "grpo", reads=["sft"])
    assert pick_model(RunDir(run), None, chat=True)[0] == "grpo"
    # SFT retrained on the same inputs gives the same weights (CPU, fp32): grpo is still current
    code, err = cli(capsys, "sft", "--run-dir", run, "--force")
    assert code == 0 and pick_model(RunDir(run), None, chat=True)[0] == "grpo"
    # SFT retrained otherwise: grpo was trained on the earlier SFT, so it is passed over, and that is said
    code, err = cli(capsys, "sft", "--run-dir", run, "--force", "--set", "sft.lr=0.002")
    assert code == 0, err
    name, path, notes = pick_model(RunDir(run), None, chat=True)
    assert name == "sft" and path == run / "sft" / "final"
    assert notes and notes[0].startswith("grpo passed over: sft was rebuilt after it")
    r = zc("chat", "--run-dir", run, input="/quit\n")
    assert r.returncode == 0 and "grpo passed over" in r.stderr and "chatting with sft" in r.stderr
    # export without --stage: the same rule (pretrain is current too, but sft comes later)
    assert pick_model(RunDir(run), None, chat=False)[0] == "sft"


@pytest.mark.slow
def test_a_second_writer_is_refused_while_readers_go_on(run):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom zero_chatgpt.core.runlock import RunLock\n"
         "with RunLock(sys.argv[1], 'pretrain'):\n    print('locked', flush=True)\n    time.sleep(60)\n", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = zc("data", "--run-dir", run)
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert f"is in use by process {holder.pid} (zero-chatgpt pretrain" in r.stderr
        r = zc("chat", "--run-dir", run, input="/quit\n")      # reading needs no lock
        assert r.returncode == 0, r.stderr
    finally:
        holder.kill()
        holder.wait()
    r = zc("data", "--run-dir", run)                         # the holder died: the lock went with it
    assert r.returncode == 0 and "up to date" in r.stderr


@pytest.mark.slow
def test_reading_commands_write_nothing(run, tmp_path):
    before = tree(run)
    r = zc("chat", "--run-dir", run, "--set", "chat.temperature=0", input="/quit\n")
    assert r.returncode == 0, r.stderr
    r = zc("export", "--run-dir", run, "--out", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    assert tree(run) == before


@pytest.mark.slow
def test_default_run_dir_is_per_preset(tmp_path):
    r = zc("eval", "--preset", "seed-0.1b", cwd=tmp_path)
    assert r.returncode == 2 and "runs/seed-0.1b" in r.stderr
    import itertools

    from zero_chatgpt.data.builtin import iter_reviews
    (tmp_path / "in.txt").write_text("\n".join(r["text"] for r in itertools.islice(iter_reviews(), 200)))
    r = zc("data", "--source", "text:in.txt", "--set", "data.workers=1", cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "runs" / "demo" / "data" / "stats.json").exists()
    saved = (tmp_path / "runs" / "demo" / "config.toml").read_text()
    # naming another preset for an existing run is refused instead of replacing its config
    r = zc("data", "--run-dir", "runs/demo", "--preset", "seed-0.1b", cwd=tmp_path)
    assert r.returncode == 2 and "is a run of preset 'demo'" in r.stderr and "runs/seed-0.1b" in r.stderr
    assert (tmp_path / "runs" / "demo" / "config.toml").read_text() == saved


@pytest.mark.parametrize("override, key", [
    ('run.device="tpu"', "run.device"), ("model.hidden_size=130", "model.hidden_size"),
    ("pretrain.micro_batch_size=0", "pretrain.micro_batch_size"),
    ("model.num_attention_heads=0", "model.num_attention_heads"), ("pretrain.max_steps=-5", "pretrain.max_steps"),
    ("sft.lr=0", "sft.lr"), ("data.val_fraction=1.5", "data.val_fraction"), ("model.num_key_value_heads=3", "model.num_key_value_heads"),
    ("pretrain.seq_len=4096", "pretrain.seq_len"), ('pretrain.schedule="linear"', "pretrain.schedule"),
    ("data.lsh_bands=7", "data.lsh_bands"), ("tokenizer.vocab_size=200", "tokenizer.vocab_size"),
    ("chat.top_p=0", "chat.top_p"), ("eval.max_new_tokens=0", "eval.max_new_tokens"),
])
def test_config_values_and_relations_are_checked_before_anything_runs(override, key):
    with pytest.raises(UserError, match=rf"config key '{key}'"):
        config.resolve(__import__("pathlib").Path("/nonexistent"), "demo", [override])


def test_a_rejected_override_is_not_saved(run):
    saved = (run / "config.toml").read_text()
    r = zc("pretrain", "--run-dir", run, "--set", "model.hidden_size=129")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "model.hidden_size" in r.stderr
    assert "not divisible by model.num_attention_heads" in r.stderr
    assert (run / "config.toml").read_text() == saved


def test_every_key_has_a_rule_and_demo_uses_the_gpu_when_there_is_one():
    schema = config.defaults()
    assert {s: set(v) for s, v in schema.items()} == {s: set(v) for s, v in config.RULES.items()}
    assert config.load_preset("demo").run.device == "auto"
    for name in config.preset_names():
        config.validate(config.load_preset(name))


LEGACY = "979da15"     # the version before stage records


@pytest.mark.slow
def test_runs_of_the_previous_version_are_kept_not_replaced(tmp_path, capsys):
    """A run made by the previous version's real code: its records do not say what each stage was built
    from, so its trained models and the stages they were built from are refused, never replaced, and
    nothing in the run changes; a new run directory works as usual."""
    old = previous_version(tmp_path / "old", LEGACY)
    corpus, chat = write_sources(tmp_path / "src")
    run = tmp_path / "run"
    env = {"PYTHONPATH": str(old)}
    for args in (["data", "--source", f"jsonl:{corpus}", *tiny_args()], ["tokenizer"], ["pretrain"],
                 ["sft", "--source", f"messages:{chat}"]):
        r = zc(args[0], "--run-dir", run, *args[1:], env=env, cwd=tmp_path)    # cwd: not this checkout's package
        assert r.returncode == 0, r.stderr[-2000:]
    assert "closure" not in json.loads((run / "pretrain" / ".stage.json").read_text())     # the old format
    before = tree(run)
    unchanged = lambda: tree(run) == {**before, ".lock": tree(run)[".lock"]}  # noqa: E731
    outputs = lambda t: {k: v for k, v in t.items() if not k.endswith((".json", "config.toml", ".lock"))}  # noqa: E731
    # the data that the trained models were built from, named with them
    code, err = cli(capsys, "run", "--run-dir", run, "--until", "sft")
    assert code == 2 and "data in" in err and "earlier version" in err and "pretrain, sft" in err, err
    assert "--force" in err and "--run-dir" in err and unchanged()
    for stage in ("pretrain", "sft"):           # a trained stage itself, even with its inputs given again
        code, err = cli(capsys, stage, "--run-dir", run, *(["--source", f"messages:{chat}"] if stage == "sft" else []))
        assert code == 2 and "earlier version" in err and "--run-dir" in err, err
        assert outputs(tree(run)) == outputs(before)   # no shard, token file or weight rewritten (--source is remembered)
    with pytest.raises(UserError, match="no current chat model"):      # nothing it can vouch for
        pick_model(RunDir(run), None, chat=True)
    # the same inputs in a new run directory: built as usual
    new = tmp_path / "new"
    code, err = cli(capsys, "data", "--run-dir", new, "--source", f"jsonl:{corpus}", *tiny_args())
    assert code == 0 and (new / "data" / ".stage.json").exists(), err


def test_deciding_what_a_stage_does_writes_nothing(run):
    """rundir.decide only reads: skip, continue, rebuild and a refusal are decided with the folder untouched;
    begin() is what acts on the decision."""
    from zero_chatgpt.core.rundir import Context, decide
    from zero_chatgpt.train.sft_data import sft_inputs

    def ctx(*overrides, force=False):
        return Context(run_dir=RunDir(run), cfg=config.resolve(run, None, list(overrides)), force=force)

    inputs = sft_inputs(ctx())      # the sources' fingerprints (cached in the run directory), as the stage passes them

    def sft(*overrides, force=False):
        return decide(ctx(*overrides, force=force), "sft", extra=inputs)

    before = tree(run)
    assert sft().action == "skip"
    steps = int(config.resolve(run, None, []).sft.max_steps)
    more = sft(f"sft.max_steps={steps + 2}")
    assert more.action == "continue" and "sft.max_steps" in more.note
    assert sft(force=True).action == "rebuild"
    with pytest.raises(UserError, match="trained from other inputs"):
        sft("sft.lr=0.123")
    assert tree(run) == before
