"""final/ is what chat, eval, export and later stages read, so it is never vouched for unverified: it is a
copy (not a hard link) of the checkpoint it comes from, verified against that checkpoint's manifest; a
damaged or deleted final/ of every trained stage is rebuilt from an intact checkpoint holding the same
weights (no training when that is the last step), or the stage stops with one line; training that
diverges (a non-finite loss or gradient norm) stops at that step and writes no final/."""
import json
import os
import shutil

import pytest

from runs import tiny_args, write_sources, zc
from test_loop_models import _lm_loss, _model, _Toy
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.train import loop

TRAINED = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


# ---------------------------------------------------------------- the loop alone

def _train(stage_dir, decay=0.0, steps=8):
    """A tiny LM whose final/ is its best evaluated step (a score of the weights), checkpoints at every
    evaluation, with or without an average of the weights."""
    s = loop.LoopSettings(max_steps=steps, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=2,
                          eval_every=2, log_every=1, precision="fp32", tensorboard=False, seed=5, keep_last=10,
                          ema_decay=decay, select_metric="score")

    scores = iter([0.1, 0.5, 0.2, 0.0] * steps)

    def eval_fn(m):           # peaks at the second evaluation (step 4), so the kept step is not the last
        return {"score": next(scores)}

    return loop.train(s, model=_model(), stage="lm", stage_dir=stage_dir, log_dir=stage_dir / "logs",
                      batches=_Toy(), loss_fn=_lm_loss, eval_fn=eval_fn, dist_info=loop.Dist())


def _truncate(path, size=1000):
    with open(path, "r+b") as fh:
        fh.truncate(size)


def test_final_is_a_verified_copy_not_a_hard_link(tmp_path):
    res = _train(tmp_path)
    final, best = tmp_path / "final", tmp_path / "best"
    assert (final / "model.safetensors").stat().st_ino != (best / "model.safetensors").stat().st_ino
    assert (final / "model.safetensors").read_bytes() == (best / "model.safetensors").read_bytes()
    meta = json.loads((final / "meta.json").read_text())
    assert meta["copied_from"] == "best" and meta["step"] == res.selected_step
    # meta's loss is the kept step's training loss, not the last step's
    log = [json.loads(x) for x in (tmp_path / "logs" / "lm.jsonl").read_text().splitlines()]
    loss_at = {r["step"]: r["loss"] for r in log if r["kind"] == "train"}
    assert meta["loss"] == pytest.approx(loss_at[res.selected_step])


@pytest.mark.parametrize("decay", [0.0, 0.6])
def test_a_final_hard_linked_to_a_damaged_best_is_rebuilt_from_the_same_step(tmp_path, decay):
    """The layout of earlier versions: final/'s file a hard link of best/'s; one truncation damages both.
    The rebuild takes the intact step-N of the kept step (its average, with EMA), never the damage."""
    res = _train(tmp_path, decay)
    step = tmp_path / f"step-{res.selected_step}"
    src = step / "ema" if decay else step
    assert src.is_dir(), "the kept step's checkpoint must exist for this case (keep_last)"
    want = (tmp_path / "final" / "model.safetensors").read_bytes()
    (tmp_path / "final" / "model.safetensors").unlink()
    os.link(tmp_path / "best" / "model.safetensors", tmp_path / "final" / "model.safetensors")
    _truncate(tmp_path / "final" / "model.safetensors")
    shutil.rmtree(tmp_path / "final")            # what the stage's record check does: final/ is damaged
    _train(tmp_path, decay)
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == want
    assert manifest.problem(tmp_path / "final") is None
    assert json.loads((tmp_path / "final" / "meta.json").read_text())["copied_from"] == \
        src.relative_to(tmp_path).as_posix()


def test_no_intact_copy_left_is_one_line_and_writes_no_manifest(tmp_path):
    res = _train(tmp_path)
    assert res.selected_step == 4
    _truncate(tmp_path / "best" / "model.safetensors")
    shutil.rmtree(tmp_path / f"step-{res.selected_step}", ignore_errors=True)
    shutil.rmtree(tmp_path / "final")
    with pytest.raises(UserError, match=rf"no intact copy of them is left .*best.*damaged.*step-{res.selected_step}"):
        _train(tmp_path)
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_non_finite_loss_stops_at_its_step_and_writes_no_final(tmp_path):
    s = loop.LoopSettings(max_steps=10, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=3,
                          eval_every=0, log_every=1, precision="fp32", tensorboard=False, seed=5)
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        loss, metrics, n = _lm_loss(m, batch)
        return (loss * float("nan") if len(calls) == 5 else loss), metrics, n

    with pytest.raises(UserError, match=r"lm: training diverged at step 5: loss = nan.*last intact checkpoint is "
                                        r".*step-3.*Lower lm.lr"):
        loop.train(s, model=_model(), stage="lm", stage_dir=tmp_path, log_dir=tmp_path / "logs", batches=_Toy(),
                   loss_fn=loss_fn, dist_info=loop.Dist())
    assert not (tmp_path / "final").exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-3"]

    def inf_grad(m, batch):                       # a finite loss whose gradient overflows
        loss, metrics, n = _lm_loss(m, batch)
        loss.register_hook(lambda g: g * float("inf"))
        return loss, metrics, n

    with pytest.raises(UserError, match=r"diverged at step 1: .*grad norm = (inf|nan)"):
        loop.train(s, model=_model(), stage="lm", stage_dir=tmp_path / "b", log_dir=tmp_path / "logs",
                   batches=_Toy(), loss_fn=inf_grad, dist_info=loop.Dist())
    assert not (tmp_path / "b" / "final").exists()


# ---------------------------------------------------------------- every trained stage, through the command

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from test_rlhf_stages import RL
    root = tmp_path_factory.mktemp("final_rebuild")
    corpus, chat = write_sources(root / "src")
    more = {**RL, "ppo.max_steps": 8, "ppo.eval_every": 4, "ppo.checkpoint_every": 4, "grpo.keep_last": 10,
            "dpo.keep_last": 10, "rm.keep_last": 10}
    args = [*tiny_args(**more), "--set", f'data.sources=["jsonl:{corpus}"]', "--set", f'sft.sources=["messages:{chat}"]']
    r = zc("run", "--run-dir", root / "run", "--until", "grpo", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    finals = {s: (root / "run" / s / "final" / "model.safetensors").read_bytes() for s in TRAINED}
    return root, finals


def _copy(root, tmp_path):
    shutil.copytree(root / "src", tmp_path / "src")
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run"


def _source(stage_dir):
    """The checkpoint final/ was copied from (best/ for a stage that keeps its best evaluated step)."""
    return stage_dir / json.loads((stage_dir / "final" / "meta.json").read_text())["copied_from"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["deleted", "truncated", "truncated, hard-linked to its source"])
def test_a_damaged_or_deleted_final_of_every_trained_stage_is_rebuilt_from_intact_weights(pipeline, tmp_path, damage):
    root, finals = pipeline
    run = _copy(root, tmp_path)
    for stage in TRAINED:
        final = run / stage / "final"
        if damage == "deleted":
            shutil.rmtree(final)
            continue
        if "hard-linked" in damage:               # the layout of earlier versions: one file, two names
            (final / "model.safetensors").unlink()
            os.link(_source(run / stage) / "model.safetensors", final / "model.safetensors")
        _truncate(final / "model.safetensors")
    if damage == "deleted":                       # said as it is: missing, not "rebuilt after it"
        r = zc("chat", "--run-dir", run, input="/quit\n")
        assert r.returncode == 2 and "final/ is missing" in r.stderr and "rebuilt after" not in r.stderr, r.stderr
    r = zc("run", "--run-dir", run, "--until", "grpo")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for stage in TRAINED:
        final = run / stage / "final"
        assert manifest.problem(final) is None, stage
        assert (final / "model.safetensors").read_bytes() == finals[stage], f"{stage}: other weights than before"
        ckpt.load_model(final)
        said = "is missing; rebuilding it from step-" if damage == "deleted" else "is damaged"
        assert f"{stage}: {final}" in r.stderr and said in r.stderr, (stage, r.stderr[-2000:])
    # rebuilt means current: every stage is up to date again, and chat-side commands take the last one
    r = zc("run", "--run-dir", run, "--until", "grpo")
    assert r.returncode == 0 and all(f"{s}: up to date" in r.stderr for s in TRAINED), r.stderr[-2000:]


@pytest.mark.slow
def test_every_trained_stage_gives_the_same_weights_again_alone_and_after_force(pipeline, tmp_path):
    """Same inputs and seed, same weights, whatever ran before a stage in its process: the fixture trained every
    stage in one `run`; here the reward model is trained again alone (its pairs rebuilt), then every stage
    again under `run --force`."""
    root, finals = pipeline
    run = _copy(root, tmp_path)
    r = zc("rm", "--run-dir", run, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (run / "rm" / "final" / "model.safetensors").read_bytes() == finals["rm"], "rm alone: other weights"
    r = zc("run", "--run-dir", run, "--until", "grpo", "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    for stage in TRAINED:
        assert (run / stage / "final" / "model.safetensors").read_bytes() == finals[stage], f"{stage}: other weights"
