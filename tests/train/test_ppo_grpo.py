"""PPO and GRPO through the one loop on a toy task with a rule reward (the share of answer tokens from a
target set): the mean reward rises over a few dozen steps while the KL stays finite, a sign-flipped
advantage makes it fall, and before the first update the ratio is exactly 1 and approx-KL exactly 0
as trained (fp32 and bf16): the recomputed log-probs are those of the training forward."""
import json

import numpy as np
import pytest
import torch
from test_sft import make_tokenizer

from zero_chatgpt.core.train_settings import GRPOSection, PPOSection
from zero_chatgpt.model.transformer import ModelConfig, Transformer
from zero_chatgpt.stages.grpo import GRPOScoring, grpo_loss
from zero_chatgpt.stages.ppo import PPOScoring, ppo_loss
from zero_chatgpt.train import loop
from zero_chatgpt.train.onpolicy import RolloutBatches, RolloutSettings
from zero_chatgpt.train.rl_math import AdaptiveKL

PPO_C = PPOSection(missing_eos_penalty=0.0, gamma=1.0, lam=0.95)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


class TargetShare:
    """The rule reward, with a reward model's `score(prompts, answers)` interface: the share of the
    answer's tokens that are in `targets`."""

    def __init__(self, targets):
        self.targets = set(targets)

    def score(self, prompts, answers):
        return np.array([sum(t in self.targets for t in a) / max(1, len(a)) for a in answers])


class Flipped:
    """A scoring whose advantages have the wrong sign: training must then lower the reward."""

    def __init__(self, inner):
        self.inner = inner

    def score(self, buf, *args):
        stats = self.inner.score(buf, *args)
        buf["advantages"] = -buf["advantages"]
        return stats

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _model(tok, seed, head="lm"):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=64, head=head,
                                   pad_token_id=tok.pad_id))


def _pool(tok):
    questions = ["「一见倾心」是什么意思？", "请解释「画蛇添足」。", "「守株待兔」出自哪里？", "用「亡羊补牢」造个句。",
                 "「对牛弹琴」的拼音是什么？", "接龙：「一心一意」", "「井底之蛙」比喻什么？", "「掩耳盗铃」的意思？"]
    return [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in questions]


def _targets(tok):
    return [i for i in range(300, 340)]       # 40 of the 800 ids: ~5 % of a uniform sample


def _train(tok, tmp_path, method: str, *, steps: int, flip: bool = False, precision: str = "fp32", lr: float = 1e-2):
    rs = RolloutSettings(prompts=8, samples_per_prompt=4 if method == "grpo" else 2, epochs=2, minibatches=2,
                         temperature=1.0, max_new_tokens=12, seed=3)
    policy, ref = _model(tok, 0), _model(tok, 0).eval()
    reward = TargetShare(_targets(tok))
    extra = None
    if method == "ppo":
        critic = _model(tok, 1, head="score")
        scoring = PPOScoring(critic, reward, AdaptiveKL(0.02), PPO_C, tok, rs.prompts)
        loss_fn = ppo_loss(rs.temperature, 0.2, 0.2, 0.1)
        extra = {"critic": (critic, {"lr": lr})}
    else:
        scoring = GRPOScoring(reward, None, rs.samples_per_prompt, GRPOSection(missing_eos_penalty=0.0), tok)
        loss_fn = grpo_loss(rs.temperature, 0.2, 0.02)
    if flip:
        scoring = Flipped(scoring)
    batches = RolloutBatches(rs, pool=_pool(tok), policy=policy, ref=ref, tok=tok, scoring=scoring,
                             precision=precision)
    s = loop.LoopSettings(max_steps=steps, lr=lr, warmup_steps=0, schedule="constant", precision=precision,
                          checkpoint_every=0, eval_every=0, log_every=1, tensorboard=False, seed=5, weight_decay=0.0)
    loop.train(s, model=policy, stage=method, stage_dir=tmp_path / method, log_dir=tmp_path / "logs", batches=batches,
               loss_fn=loss_fn, extra_models=extra)
    logs = [json.loads(x) for x in (tmp_path / "logs" / f"{method}.jsonl").read_text().splitlines()]
    return [h["reward"] for h in batches.history], [h["kl"] for h in batches.history], logs


def _means(rewards, k=5):
    return float(np.mean(rewards[:k])), float(np.mean(rewards[-k:]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_the_reward_rises_and_the_kl_stays_finite(tok, tmp_path, method):
    rewards, kls, logs = _train(tok, tmp_path, method, steps=80)
    first, last = _means(rewards)
    # the share of target tokens more than doubles (seeds 3-6 measured: PPO 2.0-4.2x, GRPO 7-11x)
    assert last > 2 * first, (method, rewards)
    assert all(np.isfinite(kls)) and max(kls) < 50, kls
    assert kls[0] == 0.0 and kls[-1] > 0          # the policy starts at the reference and moves away from it


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_a_sign_flipped_advantage_makes_the_reward_fall(tok, tmp_path, method):
    rewards, _, _ = _train(tok, tmp_path, method, steps=40, flip=True)
    first, last = _means(rewards)
    assert last < first * 0.75, (method, rewards)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_before_the_first_update_the_ratio_is_exactly_one(tok, tmp_path, method, precision):
    _, _, logs = _train(tok, tmp_path, method, steps=2, precision=precision)
    first = next(r for r in logs if r["kind"] == "train" and r["step"] == 1)
    assert first["ratio"] == 1.0 and first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0, first
    second = next(r for r in logs if r["kind"] == "train" and r["step"] == 2)
    assert second["approx_kl"] > 0                 # after one update the policy has moved


def test_rule_rewards_check_pinyin_and_chaining_exactly(tok):
    from zero_chatgpt.stages.grpo import rule_rewards
    recs = [{"reference": "yī jiàn qīng xīn", "meta": {"kind": "pinyin"}},
            {"reference": "", "meta": {"kind": "chain", "first_char": "心", "idiom": "一见倾心"}},
            {"reference": "初次见面就十分爱慕。", "meta": {"kind": "meaning"}}]
    fn = rule_rewards(recs, tok, {"一见倾心", "心花怒放"})

    def ans(text):
        return tok.encode(text) + [tok.im_end_id]
    got = fn([0, 0, 1, 1, 1, 2], [ans("yi1 jian4 qing1 xin1"), ans("yī jiàn qīng xìn"), ans("心花怒放。"),
                                  ans("心心相印"), ans("一见倾心"), ans("初次见面就十分爱慕。")])
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]   # a wrong tone; not an idiom; the one asked; no rule for meaning

    # the reference reward: char_f1 against the record's reference, on the kinds with one right answer only
    from zero_chatgpt.eval.metrics import char_f1
    ref = rule_rewards(recs, tok, {"一见倾心", "心花怒放"}, rules=False, reference=True)
    got = ref([2, 2, 1], [ans("初次见面就十分爱慕。"), ans("初次见面"), ans("心花怒放。")])
    assert got == [1.0, char_f1("初次见面", "初次见面就十分爱慕。"), 0.0] and 0 < got[1] < 1
    both = rule_rewards(recs, tok, {"一见倾心", "心花怒放"}, rules=True, reference=True)
    assert both([0], [ans("yī jiàn qīng xīn")]) == [1.0 + char_f1("yī jiàn qīng xīn", "yī jiàn qīng xīn")]


def test_sequence_rewards_take_off_the_eos_and_loop_penalties(tok):
    """An answer cut before its end loses missing_eos_penalty, one that loops (eval's repetition_rate: a
    4-gram three times) loses loop_penalty, on top of the rule reward; the logs get the loop rate."""
    from zero_chatgpt.eval.metrics import is_repetitive
    from zero_chatgpt.train.onpolicy import sequence_rewards
    end = [tok.im_end_id]
    loop_text, plain = "一见倾心，一见倾心，一见倾心。", "初次见面就十分爱慕。"
    assert is_repetitive(loop_text) and not is_repetitive(plain)
    answers = [tok.encode(plain) + end, tok.encode(loop_text) + end, tok.encode(plain), tok.encode(loop_text)]

    def rule_fn(idx, answers):
        return [0.25] * len(answers)
    seq, stats = sequence_rewards(None, rule_fn, [[1]] * 4, answers, [0] * 4, tok, 1.0, 0.5)
    assert seq.tolist() == pytest.approx([0.25, -0.25, -0.75, -1.25])
    assert stats["loop_rate"] == 0.5 and stats["reward"] == pytest.approx(seq.mean().item())
    seq0, stats0 = sequence_rewards(None, rule_fn, [[1]] * 4, answers, [0] * 4, tok, 1.0)   # no loop penalty
    assert seq0.tolist() == pytest.approx([0.25, 0.25, -0.75, -0.75]) and "loop_rate" not in stats0


def test_grpo_adds_the_sft_mix_loss_when_ptx_coef_is_set(tok):
    """grpo.ptx_coef: the loss of a batch with a `ptx` part is the RL loss + ptx_coef x the SFT loss of those
    conversations (the same mix as PPO-ptx), and the logs carry that SFT loss."""
    from zero_chatgpt.model.losses import IGNORE
    from zero_chatgpt.train.alignment import sft_mix_loss
    rs = RolloutSettings(prompts=8, samples_per_prompt=4, epochs=1, minibatches=1, temperature=1.0,
                         max_new_tokens=8, seed=3)
    policy, ref = _model(tok, 0), _model(tok, 0).eval()
    scoring = GRPOScoring(TargetShare(_targets(tok)), None, rs.samples_per_prompt, GRPOSection(missing_eos_penalty=0.0), tok)
    b = RolloutBatches(rs, pool=_pool(tok), policy=policy, ref=ref, tok=tok, scoring=scoring, precision="fp32")(1, 0, 0, 1)
    ids = torch.tensor([tok.encode("一见倾心，画蛇添足。") + [tok.im_end_id]] * 2)
    labels = ids.clone()
    labels[:, :3] = IGNORE
    ptx = {"input_ids": ids, "labels": labels}
    with torch.no_grad():
        plain, m0, n0 = grpo_loss(1.0, 0.2, 0.02)(policy, b)
        mixed, m1, n1 = grpo_loss(1.0, 0.2, 0.02, ptx_coef=0.5)(policy, {**b, "ptx": ptx})
        sft = sft_mix_loss(policy, ptx)
    assert n0 == n1 and "ptx_loss" not in m0 and float(m1["ptx_loss"]) == pytest.approx(float(sft))
    assert float(sft) > 1.0 and float(mixed - plain) == pytest.approx(0.5 * float(sft), rel=1e-5)
