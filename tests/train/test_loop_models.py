"""The one loop, ready for several models: output heads instead of loss options in forward, a score head
that transformers loads as LlamaForSequenceClassification, several models with their own optimizers in one
checkpoint, every rank's RNG restored on resume, trainer states of plain values, metrics reduced by name."""
import inspect
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from test_loop_resume import HERE, read_log, run_env

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.model.losses import LMLoss, ScalarValues, TokenLogProbs, chunked_cross_entropy
from zero_chatgpt.model.transformer import ModelConfig, Transformer
from zero_chatgpt.train import loop, loop_state
from zero_chatgpt.train.optim import build_optimizer

CFG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)


def _model(head="lm", seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFG, head=head, pad_token_id=0))


def test_forward_takes_outputs_not_loss_options():
    params = inspect.signature(Transformer.forward).parameters
    assert "output" in params and not {"labels", "ul_candidates", "ul_alpha"} & set(params)
    m = _model()
    x = torch.randint(1, 97, (3, 10))
    y = torch.randint(1, 97, (3, 10))
    y[0, :4] = -100
    logits = m(x)
    # per-token log-probs at a temperature, 0 where ignored; with the entropy of that distribution
    lp, ent = m(x, output=TokenLogProbs(y, temperature=0.7, entropy=True))
    ref = torch.log_softmax(logits / 0.7, -1)
    want = ref.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    assert torch.allclose(lp, want, atol=1e-6) and (lp[0, :4] == 0).all()
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1) * (y != -100), atol=1e-5) and (ent[0, :4] == 0).all()
    # the fused LM loss is the summed cross-entropy of the same logits
    total = m(x, output=LMLoss(y))
    assert torch.allclose(total, F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1), reduction="sum"), atol=1e-4)
    h = m(x, return_hidden=True)
    assert torch.allclose(total, chunked_cross_entropy(h, m.lm_head.weight, y), atol=1e-6)
    # a score head gives one value per position
    v = _model("score")(x, output=ScalarValues())
    assert v.shape == (3, 10) and v.dtype == torch.float32


def test_a_score_model_loads_in_transformers_as_sequence_classification(tmp_path):
    from transformers import AutoModelForSequenceClassification
    m = _model("score", seed=3)
    ckpt.save_checkpoint(tmp_path, "final", model_state=m.state_dict(), cfg=m.config)
    cfg = json.loads((tmp_path / "final" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final", torch_dtype=torch.float32).eval()
    x = torch.randint(1, 97, (2, 12))
    with torch.no_grad():
        theirs = hf(x).logits[:, 0]                      # pooled at the last real token
        ours = m.eval()(x)[:, -1]
    assert torch.allclose(theirs, ours, atol=1e-5)
    back = ckpt.load_model(tmp_path / "final")
    assert back.config.head == "score" and torch.equal(back.score.weight, m.score.weight)


class _Toy:
    """A pure batch source over random token rows (the same rows for any resume)."""

    def __call__(self, step, micro, rank, world):
        g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
        x = torch.randint(1, 97, (4, 17), generator=g)
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def _actor_critic_loss(models, batch):
    """LM loss of the actor + a value loss of the critic toward a noisy target (uses the RNG)."""
    actor, critic = models["model"], models["critic"]
    n = batch["labels"].numel()
    lm = actor(batch["input_ids"], output=LMLoss(batch["labels"])) / n
    v = critic(batch["input_ids"], output=ScalarValues())
    target = torch.rand(v.shape)
    vloss = ((v - target) ** 2).mean()
    return lm + vloss, {"value_loss": vloss.detach()}, n


def _train_actor_critic(stage_dir, steps):
    s = loop.LoopSettings(max_steps=steps, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=2,
                          eval_every=0, log_every=1, precision="fp32", tensorboard=False, seed=5, keep_last=5)
    return loop.train(s, model=_model(), stage="ac", stage_dir=stage_dir, log_dir=stage_dir / "logs",
                      batches=_Toy(), loss_fn=_actor_critic_loss, dist_info=loop.Dist(),
                      extra_models={"critic": (_model("score", seed=1), {"lr": 1e-2, "grad_clip": 0.5})})


def _log(d):
    return [json.loads(x) for x in (d / "logs" / "ac.jsonl").read_text().splitlines()]


def test_two_models_with_their_own_optimizers_resume_exactly(tmp_path):
    _train_actor_critic(tmp_path / "one", 6)
    _train_actor_critic(tmp_path / "two", 3)            # stopped at step 3 (checkpoints step-2, step-3) ...
    _train_actor_critic(tmp_path / "two", 6)            # ... and continued: the same steps as one run
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("tokens_per_s",)} for r in recs]  # noqa: E731
    assert strip(_log(tmp_path / "one")) == strip(_log(tmp_path / "two"))
    rec = _log(tmp_path / "one")[-1]
    assert {"loss", "grad_norm", "grad_norm_critic", "value_loss"} <= set(rec)
    step = tmp_path / "one" / "step-6"
    assert (step / "critic" / "model.safetensors").exists() and (step / "critic" / "config.json").exists()
    state = ckpt.load_trainer_state(step)
    assert set(state["optimizer"]) == {"model", "critic"}
    assert [g["lr"] for g in state["optimizer"]["critic"]["param_groups"]] == [1e-2, 1e-2]
    assert [g["lr"] for g in state["optimizer"]["model"]["param_groups"]] == [3e-3, 3e-3]
    # final/ holds the actor alone, at the root: what chat / export / eval read
    final = tmp_path / "one" / "final"
    assert not (final / "critic").exists() and ckpt.load_model(final).config.head == "lm"
    assert ckpt.read_model_config(step / "critic").head == "score"


def test_trainer_state_holds_plain_values_only():
    import numpy as np
    st = loop_state.plain({"data": {"pos": np.int64(3), "perm": np.arange(4)}, "x": [np.float32(0.5)]})
    assert st["data"]["pos"] == 3 and type(st["data"]["pos"]) is int and torch.equal(st["data"]["perm"],
                                                                                         torch.arange(4))
    with pytest.raises(TypeError, match="trainer state.data.bad: set"):
        loop_state.plain({"data": {"bad": {1, 2}}})


@pytest.mark.slow
def test_ddp_resume_restores_every_ranks_random_state(tmp_path):
    """Each rank draws from its own RNG in the loss; a job stopped at step 3 and continued must log what
    the uninterrupted job logs (before: rank 0's RNG state was restored on every rank)."""
    def job(d, steps):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(HERE), str(d), "--steps", str(steps), "--ckpt-every", "3", "--noisy", "--constant",
                            "--metrics"], env=run_env(), capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
    job(tmp_path / "one", 6)
    job(tmp_path / "two", 3)
    job(tmp_path / "two", 6)
    assert read_log(tmp_path / "one")[0] == read_log(tmp_path / "two")[0]      # train losses, bitwise
    # metrics are summed by name across ranks (rank 1 names them in another order and has one more)
    rec = [json.loads(x) for x in (tmp_path / "one" / "logs" / "pretrain.jsonl").read_text().splitlines()][0]
    assert (rec["a"], rec["b"], rec["c"]) == (1.5, 15.0, 2.5)


def test_tokenizer_and_encoder_import_no_stage():
    code = ("import sys, zero_chatgpt.model.tokenizer, zero_chatgpt.model.shard_encoding\n"
            "assert not any(m in sys.modules for m in ('zero_chatgpt.stages.tokenizer', 'zero_chatgpt.core.rundir')), "
            "sorted(m for m in sys.modules if m.startswith('zero_chatgpt'))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import ast

    import zero_chatgpt.model.tokenizer as t
    tree = ast.parse(open(t.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {"zero_chatgpt.model.shard_encoding", "zero_chatgpt.stages.tokenizer"} & imported


def _lm_loss(model, batch):
    n = batch["labels"].numel()
    return model(batch["input_ids"], output=LMLoss(batch["labels"])) / n, {}, n


def _train_with_ema(stage_dir, steps, seen=None, decay=0.6, select=False):
    """A tiny LM with an EMA of its weights; `seen` collects the live weights each step starts from."""
    s = loop.LoopSettings(max_steps=steps, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=3,
                          eval_every=2, log_every=1, precision="fp32", tensorboard=False, seed=5, keep_last=5,
                          ema_decay=decay, select_metric="score" if select else "")
    model = _model()

    def loss_fn(m, batch):
        if seen is not None:
            seen.append([p.detach().clone() for p in model.parameters()])
        return _lm_loss(m, batch)

    evals = []

    def eval_fn(m):                      # what the evaluation sees: a fingerprint of the weights it is given
        w = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
        evals.append(w.clone())
        return {"score": float(-w.double().norm())}

    res = loop.train(s, model=model, stage="lm", stage_dir=stage_dir, log_dir=stage_dir / "logs", batches=_Toy(),
                     loss_fn=loss_fn, eval_fn=eval_fn, dist_info=loop.Dist())
    return res, model, evals


def _weights(folder):
    return [p.detach() for p in ckpt.load_model(folder).parameters()]


def test_ema_of_the_weights_is_evaluated_and_shipped_and_resumes_exactly(tmp_path):
    seen = []
    res, model, evals = _train_with_ema(tmp_path / "one", 8, seen)
    live = [p.detach() for p in model.parameters()]
    # the expected average, folded by hand over the weights after each step
    after = seen[1:] + [live]
    ema = [p.clone() for p in seen[0]]
    for w in after:
        ema = [0.6 * e + 0.4 * x for e, x in zip(ema, w)]
    final = _weights(tmp_path / "one" / "final")
    assert all(torch.allclose(f, e, atol=1e-6) for f, e in zip(final, ema))
    assert not all(torch.allclose(f, x, atol=1e-4) for f, x in zip(final, live)), "final/ holds the live weights"
    # step-N keeps both: the live weights at its root (training resumes from them) and the average in ema/
    step = tmp_path / "one" / "step-8"
    assert all(torch.equal(a, b) for a, b in zip(_weights(step), live))
    assert all(torch.equal(a, b) for a, b in zip(_weights(step / "ema"), final))
    # the last evaluation saw the average
    assert torch.allclose(evals[-1], torch.cat([e.reshape(-1) for e in ema]), atol=1e-6)
    meta = json.loads((tmp_path / "one" / "final" / "meta.json").read_text())
    assert meta["weights"] == "exponential moving average, decay 0.6"
    # stopped at step 4 (checkpoint step-3) and continued: bitwise the same average and weights
    _train_with_ema(tmp_path / "two", 4)
    _train_with_ema(tmp_path / "two", 8)
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "two" / "final"), final))
    assert all(torch.equal(a, b) for a, b in zip(_weights(tmp_path / "two" / "step-8"), live))


def test_ema_selected_by_metric_ships_the_best_average(tmp_path):
    res, _, evals = _train_with_ema(tmp_path, 8, select=True)
    best = res.selected_step
    assert best > 0
    want = evals[[e["step"] for e in res.evals].index(best)]
    got = torch.cat([p.reshape(-1) for p in _weights(tmp_path / "final")])
    assert torch.equal(got, want)


def test_ema_settings_are_checked():
    from zero_chatgpt.core import config
    from zero_chatgpt.core.errors import UserError
    demo = config.load_preset("demo")
    with pytest.raises(UserError, match="'sft.ema_decay' = 1.0: must be a finite number >= 0 and < 1"):
        config.validate(config.apply_overrides(demo, ["sft.ema_decay=1.0"]))
    with pytest.raises(UserError, match="fsdp"):
        config.validate(config.apply_overrides(demo, ["sft.ema_decay=0.9", "sft.fsdp=true"]))


def _train_muon(stage_dir, steps):
    s = loop.LoopSettings(max_steps=steps, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=3,
                          eval_every=0, log_every=1, precision="fp32", tensorboard=False, seed=5, optimizer="muon")
    model = _model()
    loop.train(s, model=model, stage="lm", stage_dir=stage_dir, log_dir=stage_dir / "logs", batches=_Toy(),
               loss_fn=_lm_loss, dist_info=loop.Dist())
    return model


def test_muon_trains_the_blocks_matrices_and_resumes_exactly(tmp_path):
    """optimizer = muon: torch's Muon for the blocks' 2-D weights, AdamW for embedding and norms, one
    optimizer state in the checkpoint; a run stopped and continued ends bitwise where one run does."""
    m = _model()
    opt = build_optimizer(m, loop.LoopSettings(optimizer="muon"), torch.device("cpu"))
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    muon_names = {n for n, p in m.named_parameters() if id(p) in in_muon}
    assert muon_names == {n for n, _ in m.named_parameters() if ".layers." in n and n.endswith("proj.weight")}
    assert len(muon_names) == 7 * CFG["num_hidden_layers"]
    one = _train_muon(tmp_path / "one", 6)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "one" / "logs" / "lm.jsonl").read_text().splitlines()
              if json.loads(x)["kind"] == "train"]
    assert losses[-1] < losses[0]
    _train_muon(tmp_path / "two", 3)
    two = _train_muon(tmp_path / "two", 6)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters()))
    from zero_chatgpt.core import config
    with pytest.raises(Exception, match="optimizer"):
        config.validate(config.apply_overrides(config.load_preset("demo"), ["pretrain.optimizer=\"sgd\""]))


def test_a_selection_gate_keeps_only_steps_that_pass_it(tmp_path):
    """select_gate: a trained step is a candidate only when the gate value is above 0 (RL: the lower end of its
    gold gain's interval over SFT); step 0 always is. The best-scoring step here fails the gate."""
    evals = iter([(0.1, 0.0), (0.5, -0.1), (0.3, 0.05), (0.2, 0.2)])
    s = loop.LoopSettings(max_steps=6, lr=3e-3, warmup_steps=0, schedule="constant", checkpoint_every=2,
                          eval_every=2, log_every=1, precision="fp32", tensorboard=False, seed=5, keep_last=10,
                          select_metric="score", select_gate="gate", eval_at_start=True, select_from_start=True)

    def eval_fn(m):
        score, gate = next(evals)
        return {"score": score, "gate": gate}

    res = loop.train(s, model=_model(), stage="lm", stage_dir=tmp_path, log_dir=tmp_path / "logs", batches=_Toy(),
                     loss_fn=_lm_loss, eval_fn=eval_fn, dist_info=loop.Dist())
    assert [e["step"] for e in res.evals] == [0, 2, 4, 6] and res.selected_step == 4
    assert json.loads((tmp_path / "final" / "meta.json").read_text())["step"] == 4
