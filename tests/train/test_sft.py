"""SFT: masking (single- and multi-turn), truncation invariants, length-grouped batches, a toy run that learns."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runs import record_stage
from zero_chatgpt.data.builtin import load_idioms
from zero_chatgpt.stages import sft
from zero_chatgpt.train import sft_data

# A toy task the model must learn: a word → its category.
TOY = {"苹果": "水果", "白菜": "蔬菜", "老虎": "动物", "松树": "植物", "铁锤": "工具", "长江": "河流",
       "泰山": "高山", "北京": "城市"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: one thread is faster than two, and much faster on a shared, busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _targets(tok, ids, mask):
    inp, labels = sft_data.to_example(ids, mask)
    assert len(inp) == len(labels) == len(ids) - 1
    for t, lab in enumerate(labels):                 # every target is the next token, where the mask says so
        assert lab == (ids[t + 1] if mask[t + 1] else sft_data.IGNORE)
    return [x for x in labels if x != sft_data.IGNORE]


def test_masking_single_turn(tok):
    msgs = [{"role": "user", "content": "「一见倾心」是什么意思？"}, {"role": "assistant", "content": "初次见面就十分爱慕。"}]
    ids, mask = tok.encode_chat(msgs)
    tgt = _targets(tok, ids, mask)
    assert tok.decode(tgt) == "初次见面就十分爱慕。<|im_end|>"
    assert tgt[-1] == tok.im_end_id and tgt.count(tok.im_end_id) == 1


def test_masking_multi_turn_with_system(tok):
    msgs = [{"role": "system", "content": "你是成语老师。"},
            {"role": "user", "content": "一见倾心是什么意思？"}, {"role": "assistant", "content": "倾心爱慕。"},
            {"role": "user", "content": "它怎么读？"}, {"role": "assistant", "content": "yī jiàn qīng xīn"}]
    ids, mask = tok.encode_chat(msgs)
    tgt = _targets(tok, ids, mask)
    assert tok.decode(tgt) == "倾心爱慕。<|im_end|>yī jiàn qīng xīn<|im_end|>"
    # nothing of the system prompt or the questions is a target
    batch = sft_data.collate(sft_data.SFTSet(np.asarray(ids, np.int32), np.asarray(mask, np.int8),
                                   np.asarray([0, len(ids)])), [0], tok.pad_id)
    lab = batch["labels"][0]
    assert tok.decode(lab[lab != sft_data.IGNORE].tolist()) == tok.decode(tgt)


def _conv(n_turns, ans_len, q_len=6):
    msgs = []
    for i in range(n_turns):
        msgs += [{"role": "user", "content": "问" * q_len + str(i)}, {"role": "assistant", "content": "答" * ans_len}]
    return msgs


@settings(max_examples=60, deadline=None)
@given(n_turns=st.integers(1, 3), ans_len=st.integers(1, 40), max_len=st.integers(4, 80))
def test_truncation_invariants(tok, n_turns, ans_len, max_len):
    msgs = _conv(n_turns, ans_len)
    ids, mask = tok.encode_chat(msgs)
    t_ids, t_mask, cut = sft_data.truncate(ids, mask, max_len)
    assert cut == (len(ids) > max_len) and len(t_ids) == min(len(ids), max_len)
    assert t_ids == ids[:len(t_ids)] and t_mask == mask[:len(t_mask)]      # a prefix: nothing replaced
    full_tgt = _targets(tok, ids, mask)
    if sum(t_mask[1:]) == 0:
        return
    tgt = _targets(tok, t_ids, t_mask)
    assert tgt == full_tgt[:len(tgt)]                # the targets are a prefix of the real answers
    assert "问" not in tok.decode(tgt)               # never the prompt as an answer (the seed's bug)
    if cut and t_mask[-1] == 1 and t_ids[-1] != tok.im_end_id:
        # the last answer was cut: it carries no eos
        assert tgt.count(tok.im_end_id) < full_tgt.count(tok.im_end_id)


def test_encode_counts_truncated_and_dropped(tok):
    recs = [{"messages": _conv(1, 50)}, {"messages": _conv(1, 2)}, {"messages": _conv(1, 2, q_len=60)}]
    full = [sft_data.trim_tail(*tok.encode_chat(r["messages"])) for r in recs]
    max_len = len(full[1][0])               # the short one fits exactly (its closing newline is trimmed)
    assert full[1][0][-1] == tok.im_end_id
    assert full[0][1].index(1) < max_len < len(full[0][0])      # the long answer starts inside, ends outside
    assert full[2][1].index(1) >= max_len                          # the long question leaves no answer token
    data = sft_data.encode_records(tok, recs, max_len=max_len)
    assert data.n_records == 3 and data.n_truncated == 1 and data.n_dropped == 1 and len(data) == 2
    assert data.lengths().max() <= max_len
    first_ids, first_mask = data.sample(0)
    assert first_ids[-1] != tok.im_end_id and first_mask[-1] == 1     # cut inside the answer: no eos


@pytest.fixture(scope="module")
def real_set(tok):
    from zero_chatgpt.data import chat_data
    built = chat_data.build_builtin(load_idioms()[:4000], seed=5)
    return sft_data.encode_records(tok, built.splits["train"][:3000], 256)


def test_length_grouped_batches(real_set):
    lengths = real_set.lengths()
    budget = 2048
    plan = sft_data.plan_epoch(lengths, budget, seed=1, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(real_set)))           # every sample once per epoch
    for b in plan:
        assert len(b) == 1 or len(b) * int((lengths[b] - 1).max()) <= budget
    pad = sft_data.pad_fraction(lengths, plan)
    assert pad <= 0.15, pad
    # against no grouping: the same budget, random order, pads much more
    rnd = np.random.default_rng(0).permutation(len(lengths))
    naive = [rnd[i:i + len(plan[0])] for i in range(0, len(rnd), len(plan[0]))]
    assert sft_data.pad_fraction(lengths, naive) > pad
    assert sft_data.plan_epoch(lengths, budget, 1, 1)[0].tolist() != plan[0].tolist()   # epochs reshuffle


def test_batch_source_is_pure_and_splits_ranks(tok, real_set):
    b = sft_data.LengthGroupedBatches(real_set, tok.pad_id, 2048, grad_accum=2, seed=3)
    x = b(5, 1, 0, 2)
    y = sft_data.LengthGroupedBatches(real_set, tok.pad_id, 2048, grad_accum=2, seed=3)(5, 1, 0, 2)
    assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert not set(b.indices((5 * 2 + 1) * 2 + 0).tolist()) & set(b.indices((5 * 2 + 1) * 2 + 1).tolist())
    # walks into the next epoch
    n = len(b.plan(0))
    assert b.indices(n).tolist() == b.plan(1)[0].tolist()
    # padding is never a target
    assert (x["labels"][x["input_ids"] == tok.pad_id] == sft_data.IGNORE).all()


def _tiny_model(tok):
    """rope_theta 1e4: the peer-parity tests were written on it. At 1e6 our per-sequence log-probs still equal
    HF's unpadded ones to 1e-6, but TRL's DPO loss over its left-padded batch moves by 5e-5 (its padding)."""
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=128, rope_theta=1e4,
                                   eos_token_id=[tok.im_end_id, tok.eot_id],
                                   pad_token_id=tok.pad_id))


_TOY_RUNS: dict = {}


def toy_run_copy(root, tmp_path_factory):
    """A copy of the toy run (trained once per test session) in `root`; for tests/serve/test_chat.py, test_eval.py."""
    import shutil
    if "dir" not in _TOY_RUNS:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        d = tmp_path_factory.mktemp("toy_run_master")
        tok = make_tokenizer()
        _TOY_RUNS.update(dir=d, tok=tok, result=train_toy_run(tok, d))
        record_stage(d, "tokenizer")
        record_stage(d, "sft", reads=["tokenizer"])
        torch.set_num_threads(n)
    shutil.copytree(_TOY_RUNS["dir"], root, dirs_exist_ok=True)
    return _TOY_RUNS["tok"]


def train_toy_run(tok, root):
    """A tiny model fine-tuned on TOY through the one loop, in run dir `root` (tokenizer/ + sft/final)."""
    from zero_chatgpt.train import loop
    tok.save(root / "tokenizer")
    recs = [{"messages": [{"role": "user", "content": f"{k}是什么？"}, {"role": "assistant", "content": v}]}
            for k, v in TOY.items()]
    data = sft_data.encode_records(tok, recs * 4, 128)
    s = loop.LoopSettings(max_steps=120, lr=3e-3, warmup_steps=10, weight_decay=0.0, checkpoint_every=0,
                          eval_every=0, log_every=10, precision="fp32", tensorboard=False, seed=0)
    batches = sft_data.LengthGroupedBatches(data, tok.pad_id, 8 * 40, grad_accum=1, seed=0)
    model = _tiny_model(tok)
    return loop.train(s, model=model, stage="sft", stage_dir=root / "sft", log_dir=root / "logs",
                      batches=batches, loss_fn=sft_data.sft_loss, dist_info=loop.Dist())


def make_tokenizer():
    from zero_chatgpt.model.tokenizer import train_bpe
    texts = [d["word"] + "：" + d["explanation"] for d in load_idioms()[:3000]]
    texts += [f"{k}是什么？{v}" for k, v in TOY.items()]
    return train_bpe(texts, 800)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_run")
    toy_run_copy(root, tmp_path_factory)
    return root, _TOY_RUNS["result"]


def test_tiny_sft_learns_toy_task(toy_run):
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.model.generate import generate
    root, res = toy_run
    tok = _TOY_RUNS["tok"]
    logs = [json.loads(x) for x in (root / "logs" / "sft.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if r.get("kind") == "train"]
    assert losses[0] > 2.0 and losses[-1] < 0.2 * losses[0], losses
    model = load_model(root / "sft" / "final")
    prompts = [tok.encode_chat([{"role": "user", "content": f"{k}是什么？"}], add_generation_prompt=True)[0]
               for k in TOY]
    gens = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_ids=tok.stop_ids, tokenizer=tok)
    answers = [g.text for g in gens]
    assert answers == list(TOY.values())
    assert all(g.finish_reason == "stop" and g.tokens[-1] == tok.im_end_id for g in gens)


def test_sft_stage_from_source_resumes_nothing_and_reports(tok, tmp_path, capsys):
    """The stage itself: --source data, init from pretrain/final, summary with pad fraction and truncations."""
    from zero_chatgpt.core import checkpoint as ckpt
    from zero_chatgpt.core import config
    from zero_chatgpt.core.rundir import Context, RunDir, read_marker
    tok.save(tmp_path / "tokenizer")
    pre = _tiny_model(tok)
    ckpt.save_checkpoint(tmp_path / "pretrain", "final", model_state=pre.state_dict(), cfg=pre.config)
    record_stage(tmp_path, "tokenizer")
    record_stage(tmp_path, "pretrain", reads=["tokenizer"])
    src = tmp_path / "toy.jsonl"
    forms = ["{}是什么？", "请问{}是什么？", "{}属于哪一类？"]
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f.format(k)},
                                                    {"role": "assistant", "content": v * (30 if k == "长江" else 1)}]},
                                      ensure_ascii=False) + "\n" for k, v in TOY.items() for f in forms))
    cfg = config.apply_overrides(config.load_preset("demo"), [
        f'sft.sources=["messages:{src}"]', "sft.eval_fraction=0.0", "sft.rl_fraction=0.0", "sft.val_fraction=0.2",
        "sft.dedup_threshold=0.99", "sft.max_steps=30", "sft.lr=3e-3", "sft.warmup_steps=3",
        "sft.batch_tokens=256", "sft.micro_batch_tokens=128", "sft.max_seq_len=48", "sft.checkpoint_every=0",
        "sft.eval_every=0", 'sft.precision="fp32"', "sft.max_train_samples=0", "sft.tensorboard=false"])
    ctx = Context(run_dir=RunDir(tmp_path), cfg=cfg)
    sft.run_stage(ctx)
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()
    summary = read_marker(tmp_path / "sft")["summary"]
    assert summary["conversations"] + summary["records"]["val"] == len(TOY) * len(forms)
    assert summary["truncated"] >= 1                     # 长江's long answer is cut at max_seq_len
    assert 0 <= summary["pad_fraction"] <= 0.5 and summary["val_loss"] is not None
    err = capsys.readouterr().err
    assert "pad fraction" in err and "truncated to max_seq_len" in err
    sft.run_stage(ctx)                                   # unchanged inputs: skipped
    assert "up to date" in capsys.readouterr().err
