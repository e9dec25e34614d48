"""Reward model and DPO components: the score index under both paddings, losses equal to TRL's
RewardTrainer and DPOTrainer on the same batch and model, the rule-made negatives, a tiny reward model
that learns, and the loop keeping its best-evaluated checkpoint as final."""
import dataclasses
import json
import random

import pytest
import torch

from test_sft import _tiny_model, make_tokenizer
from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.data import preference as pref
from zero_chatgpt.model.transformer import ModelConfig, Transformer
from zero_chatgpt.model.reward_model import bradley_terry, last_index, pad_sequences, sequence_scores
from zero_chatgpt.train import loop
from zero_chatgpt.stages.dpo import dpo_loss
from zero_chatgpt.train.pairs import EncodedPairs, PairBatches, collate, sequence_logprobs
from zero_chatgpt.stages.rm import rm_loss
from zero_chatgpt.model.reward_model import score_model_from


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _score_model(seed=0, vocab=800):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, head="score", pad_token_id=0)).eval()


def test_the_score_is_read_at_the_last_real_token_under_either_padding():
    m = _score_model()
    seqs = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = torch.stack([m(torch.tensor([s]))[0, -1] for s in seqs])
    ids, last = pad_sequences(seqs, pad_id=0)                                   # right padding
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    assert torch.equal(last_index(mask), last)
    with torch.no_grad():
        right = sequence_scores(m, ids, last)
    T = max(map(len, seqs))                                                     # left padding
    left_ids = torch.tensor([[0] * (T - len(s)) + s for s in seqs])
    left_mask = (left_ids != 0).long()
    pos = (left_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        left = m(left_ids, attention_mask=left_mask, position_ids=pos)
    left = left.gather(1, last_index(left_mask)[:, None]).squeeze(1)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)


def test_rm_loss_equals_trl_reward_trainer(tok, tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast
    from trl import RewardConfig, RewardTrainer
    ours = score_model_from_lm(tok, tmp_path)
    hf = LlamaForSequenceClassification(LlamaConfig(**ours.config.to_hf_dict())).eval()
    assert not [k for k in hf.load_state_dict(ours.state_dict(), strict=False).missing_keys]
    tok.save(tmp_path / "tok")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok")
    data = EncodedPairs(prompts=[[5, 6, 7], [5, 9]], chosen=[[8, 9, 10, tok.im_end_id], [14, 15, tok.im_end_id]],
                        rejected=[[12, 13], [16, 17, 18, 19, tok.im_end_id]], negatives=["x", "y"])
    batch = collate(data, [0, 1], tok.pad_id)
    ds = Dataset.from_list([{"chosen": "好", "rejected": "坏"}] * 2)
    trainer = RewardTrainer(model=hf, args=RewardConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True),
                            train_dataset=ds, processing_class=hf_tok)
    mask = (torch.arange(batch["ids"].shape[1])[None] <= batch["last"][:, None]).long()
    theirs = trainer.compute_loss(trainer.model, {"input_ids": batch["ids"], "attention_mask": mask})
    mine, metrics, n = rm_loss(ours.eval(), batch)
    assert n == 2 and abs(mine.item() - theirs.item()) < 1e-5, (mine.item(), theirs.item())


def score_model_from_lm(tok, tmp_path):
    lm = _tiny_model(tok)
    ckpt.save_checkpoint(tmp_path / "sft", "final", model_state=lm.state_dict(), cfg=lm.config)
    m = score_model_from(tmp_path / "sft" / "final")
    # the backbone is the LM's, the head is new
    assert torch.equal(m.model.embed_tokens.weight, lm.model.embed_tokens.weight) and m.config.head == "score"
    return m


def test_dpo_loss_equals_trl_dpo_trainer(tok, tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    ref = _tiny_model(tok).eval()
    policy = _tiny_model(tok).eval()
    with torch.no_grad():                      # a policy that has moved away from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))

    def hf(m):
        out = LlamaForCausalLM(LlamaConfig(**m.config.to_hf_dict())).eval()
        out.load_state_dict(m.state_dict(), strict=False)
        return out
    tok.save(tmp_path / "tok")
    ex = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, tok.im_end_id], "rejected_ids": [12, 13]},
          {"prompt_ids": [5, 9], "chosen_ids": [14, 15, tok.im_end_id], "rejected_ids": [16, 17, 18, 19, tok.im_end_id]}]
    trainer = DPOTrainer(model=hf(policy), ref_model=hf(ref), train_dataset=Dataset.from_list(
        [{"prompt": "苹果", "chosen": "是水果", "rejected": "不是"}] * 2),
        args=DPOConfig(output_dir=str(tmp_path / "o"), report_to=[], beta=0.1, use_cpu=True),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tmp_path / "tok"))
    theirs = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=tok.pad_id).torch_call(ex))
    data = EncodedPairs([e["prompt_ids"] for e in ex], [e["chosen_ids"] for e in ex], [e["rejected_ids"] for e in ex],
                        ["a", "b"])
    batch = collate(data, [0, 1], tok.pad_id)
    with torch.no_grad():
        mine, _ = dpo_loss(sequence_logprobs(policy, batch), sequence_logprobs(ref, batch), beta=0.1)
    mine, theirs = mine.item(), theirs.item()
    assert abs(mine - theirs) < 1e-5 and abs(mine - 0.6931) > 1e-3, (mine, theirs)


def test_rule_made_negatives():
    rec = {"messages": [{"role": "user", "content": "「一见倾心」是什么意思？"}], "reference": "一见面就产生了爱慕之情。",
           "meta": {"kind": "meaning", "idiom": "一见倾心"}}
    chosen = pref.chosen_text(rec)
    assert chosen == "“一见倾心”的意思是：一见面就产生了爱慕之情。"
    negs = {k: (t, e) for k, t, e in pref.negatives_for(rec, ["sample", "other", "cut", "repeat", "refusal", "empty"],
                                                        random.Random(0), ["别的成语的解释。"], ("一见倾心。", True))}
    assert negs["sample"] == ("一见倾心。", True) and negs["other"] == ("别的成语的解释。", True)
    cut, ended = negs["cut"]
    assert not ended and chosen.startswith(cut) and 0.3 * len(chosen) <= len(cut) <= 0.7 * len(chosen)
    rep, _ = negs["repeat"]
    assert len(rep) > len(chosen) and any(rep.count(chosen[i:i + 2]) >= 3 for i in range(len(chosen) - 1))
    assert negs["refusal"][0] in pref.REFUSALS and negs["empty"] == ("", True)
    # a sample equal to the chosen answer is no negative
    assert "sample" not in {k for k, *_ in pref.negatives_for(rec, ["sample"], random.Random(0), [], (chosen, True))}


def test_a_tiny_reward_model_learns_toy_preferences(tok, tmp_path):
    rng = random.Random(0)
    good, bad = tok.encode("这个回答很好。"), tok.encode("这个回答很差。")
    prompts = [tok.encode(f"问题{i}：") for i in range(64)]
    data = EncodedPairs(prompts, [good + [tok.im_end_id]] * 64, [bad + [tok.im_end_id]] * 64, ["toy"] * 64)
    rng.shuffle(data.prompts)
    s = loop.LoopSettings(max_steps=40, lr=3e-3, warmup_steps=2, checkpoint_every=0, eval_every=0, log_every=40,
                          precision="fp32", tensorboard=False, seed=0)
    model = _score_model(vocab=tok.vocab_size)
    loop.train(s, model=model.train(), stage="rm", stage_dir=tmp_path / "rm", log_dir=tmp_path / "logs",
               batches=PairBatches(data, tok.pad_id, 8, 1, seed=0), loss_fn=rm_loss, dist_info=loop.Dist())
    m = ckpt.load_model(tmp_path / "rm" / "final")
    b = collate(data, list(range(64)), tok.pad_id)
    with torch.no_grad():
        r = sequence_scores(m, b["ids"], b["last"])
    assert (r[:64] > r[64:]).float().mean() == 1.0 and float(bradley_terry(r[:64], r[64:])) < 0.1


def test_the_best_evaluated_step_becomes_final(tmp_path, tok):
    """select_metric: final/ holds the weights of the best evaluation after step 0, not the last step's."""
    seen = []

    def eval_fn(m):
        step = len(seen) * 5
        seen.append(step)
        return {"gold": [0.1, 0.3, 0.5, 0.2, 0.1][len(seen) - 1]}        # steps 0, 5, 10, 15, 20: best at 10
    s = loop.LoopSettings(max_steps=20, lr=1e-3, warmup_steps=0, checkpoint_every=10, eval_every=5, log_every=5,
                          precision="fp32", tensorboard=False, seed=0, select_metric="gold", eval_at_start=True)
    toy = [torch.randint(1, tok.vocab_size, (4, 9), generator=torch.Generator().manual_seed(i)) for i in range(20)]
    batches = lambda step, micro, rank, world: {"input_ids": toy[step][:, :-1], "labels": toy[step][:, 1:]}  # noqa
    from zero_chatgpt.stages.pretrain import lm_loss_fn
    r = loop.train(s, model=_tiny_model(tok), stage="x", stage_dir=tmp_path / "x", log_dir=tmp_path / "logs",
                   batches=batches, loss_fn=lm_loss_fn, eval_fn=eval_fn, dist_info=loop.Dist())
    assert seen == [0, 5, 10, 15, 20] and r.selected_step == 10
    meta = json.loads((tmp_path / "x" / "final" / "meta.json").read_text())
    assert meta["step"] == 10 and meta["selected_by"] == "gold" and meta["trained_steps"] == 20
    final = ckpt.read_model_state(tmp_path / "x" / "final")
    best = ckpt.read_model_state(tmp_path / "x" / "best")
    last = ckpt.read_model_state(tmp_path / "x" / "step-20")
    assert all(torch.equal(final[k], best[k]) for k in final) and not all(torch.equal(final[k], last[k]) for k in final)

    # With select_from_start the starting weights compete too: when nothing beats them, final/ holds them.
    seen.clear()
    gold = iter([0.6, 0.3, 0.5, 0.2, 0.6])                              # a tie does not replace the start
    s2 = dataclasses.replace(s, select_from_start=True)
    start = _tiny_model(tok)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    r = loop.train(s2, model=start, stage="y", stage_dir=tmp_path / "y", log_dir=tmp_path / "logs",
                   batches=batches, loss_fn=lm_loss_fn, eval_fn=lambda m: {"gold": next(gold)}, dist_info=loop.Dist())
    assert r.selected_step == 0
    final = ckpt.read_model_state(tmp_path / "y" / "final")
    assert json.loads((tmp_path / "y" / "final" / "meta.json").read_text())["step"] == 0
    assert all(torch.equal(final[k], init[k]) for k in final)
