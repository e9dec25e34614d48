"""The RL details, each on its own: GAE against a naive loop, masked whitening, the adaptive KL controller,
GRPO's group normalization, and PPO's clipped losses (ratio 1 before any update: no clip, no KL)."""
import math

import pytest
import torch

from zero_chatgpt.train.rl_math import AdaptiveKL, clipped_policy_loss, clipped_value_loss, gae, group_advantages, masked_whiten


def naive_gae(r, v, gamma, lam):
    """One row, plain Python: A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t."""
    T = len(r)
    delta = [r[t] + gamma * (v[t + 1] if t + 1 < T else 0.0) - v[t] for t in range(T)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(T - t)) for t in range(T)]


def test_gae_matches_a_naive_loop_row_by_row():
    torch.manual_seed(0)
    lengths = [5, 3, 7, 1]
    T = max(lengths)
    r, v = torch.randn(4, T, dtype=torch.float64), torch.randn(4, T, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).double()
    for gamma, lam in ((1.0, 0.95), (0.99, 1.0), (0.9, 0.0)):
        adv, ret = gae(r * mask, v * mask, mask, gamma, lam)
        for i, n in enumerate(lengths):
            want = naive_gae(r[i, :n].tolist(), v[i, :n].tolist(), gamma, lam)
            assert torch.allclose(adv[i, :n], torch.tensor(want, dtype=torch.float64), atol=1e-12)
            assert (adv[i, n:] == 0).all() and torch.allclose(ret[i, :n], adv[i, :n] + v[i, :n])


def test_whitening_sees_only_the_real_tokens():
    torch.manual_seed(1)
    x = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    garbage = x + (1 - mask) * 1e6                     # padding values must not matter
    w = masked_whiten(garbage, mask)
    real = x[mask.bool()]
    want = (real - real.mean()) / real.std()
    assert torch.allclose(w[mask.bool()], want, atol=1e-5) and (w[~mask.bool()] == 0).all()


def test_adaptive_kl_moves_toward_its_target_and_is_clipped():
    c = AdaptiveKL(beta=0.1, target=6.0, horizon=10000)
    c.update(12.0, 1000)                               # KL twice the target: error clipped to +0.2
    assert math.isclose(c.beta, 0.1 * (1 + 0.2 * 0.1))
    c2 = AdaptiveKL(beta=0.1, target=6.0, horizon=10000)
    c2.update(3.0, 1000)                               # half the target: error clipped to -0.2 ... -0.5 -> -0.2
    assert math.isclose(c2.beta, 0.1 * (1 - 0.2 * 0.1))
    fixed = AdaptiveKL(beta=0.05, target=None)
    assert fixed.update(100.0, 1000) == 0.05
    c3 = AdaptiveKL(beta=1.0)
    c3.load_state_dict(c.state_dict())
    assert c3.beta == c.beta


def test_group_advantages_are_normalized_within_each_prompt():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    a = group_advantages(r, k=4)
    assert torch.allclose(a[:4], (r[:4] - 2.5) / (r[:4].std() + 1e-4)) and torch.allclose(a[4:], torch.zeros(4))


def test_group_advantages_scaled_by_the_batch_or_not_at_all():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.5, 9.5])
    centred = torch.cat([r[:4] - 2.5, r[4:] - 10.0])
    assert torch.allclose(group_advantages(r, k=4, scale="none"), centred)
    batch = group_advantages(r, k=4, scale="batch")
    assert torch.allclose(batch, centred / (r.std() + 1e-4))
    # the near-flat group keeps a small advantage under the batch's std, but a unit-size one under its own
    assert batch[4:].abs().max() < 0.2 < 0.5 < group_advantages(r, k=4)[4:].abs().max()
    assert torch.allclose(group_advantages(r, k=4, scale="batch", batch_std=2.0), centred / 2.0001)
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(r, k=4, scale="std")


def _std_worker(rank: int, port: int, rewards: torch.Tensor, out):
    import torch.distributed as dist

    from zero_chatgpt.stages.grpo import _all_ranks_std
    from zero_chatgpt.train.onpolicy import RolloutBatches

    class Src:                        # the rollout source's seam for figures over ranks
        world, device = 2, torch.device("cpu")
        all_ranks_mean = RolloutBatches.all_ranks_mean
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        out[rank] = float(_all_ranks_std(rewards.view(2, -1)[rank], Src()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_batch_std_is_over_every_rank():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    rewards = torch.tensor([0.1, 0.5, 0.2, 0.9, 3.0, 2.5, 2.0, 4.0])   # ranks' halves have very different spreads
    out = mp.get_context("spawn").Manager().dict()
    mp.spawn(_std_worker, args=(port, rewards, out), nprocs=2, join=True)
    assert abs(out[0] - float(rewards.std())) < 1e-6 and abs(out[1] - float(rewards.std())) < 1e-6


def test_clipped_losses_before_and_after_a_change():
    torch.manual_seed(2)
    logp = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    adv = torch.randn(2, 5)
    loss, m = clipped_policy_loss(logp, logp.clone(), adv, mask)
    assert m["approx_kl"] == 0 and m["clip_fraction"] == 0 and m["ratio"] == 1
    assert torch.allclose(loss, -(adv * mask).sum() / mask.sum())
    _, m = clipped_policy_loss(logp + 0.5, logp, adv, mask)          # ratio e^0.5 > 1.2 everywhere
    assert m["clip_fraction"] == 1 and m["approx_kl"] > 0
    v, old, ret = torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(2, 5)
    assert torch.allclose(clipped_value_loss(v + 1.0, old, ret, mask), clipped_value_loss(old + 0.2, old, ret, mask))
