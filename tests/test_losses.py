import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from lib.losses import (
    AdaptiveKLController,
    FixedKLController,
    candidate_ppo_loss,
    discounted_returns,
    entropy_from_logits,
    exact_kl,
    explained_variance,
    gae_advantages,
    group_in_group_advantages,
    group_relative_advantages,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    mean_var_from_moments,
    policy_loss,
    ppo_loss,
    rloo_advantages,
    turn_gae,
    value_loss,
    whiten_with_stats,
)


def prefix_mask(lengths, num_tokens):
    return torch.arange(num_tokens)[None, :] < torch.tensor(lengths)[:, None]


# ---------------------------------------------------------------- masked statistics


def test_masked_sum_mean_var_match_selection():
    torch.manual_seed(0)
    x = torch.randn(4, 7, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.4
    selected = x[mask]
    assert torch.allclose(masked_sum(x, mask), selected.sum())
    assert torch.allclose(masked_mean(x, mask), selected.mean())
    assert torch.allclose(masked_var(x, mask), selected.var(unbiased=True))
    assert torch.allclose(masked_var(x, mask, unbiased=False), selected.var(unbiased=False))
    assert torch.allclose(masked_mean(x, mask.double()), selected.mean())


def test_masked_mean_per_row_and_empty_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0, 0.0]))
    assert torch.allclose(masked_sum(x, mask, dim=0), torch.tensor([5.0, 2.0, 0.0]))


def test_masked_statistics_ignore_nan_at_masked_positions():
    x = torch.tensor([[1.0, 3.0, float("nan")], [float("inf"), 5.0, 7.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert masked_mean(x, mask).item() == pytest.approx(4.0)
    assert masked_var(x, mask).item() == pytest.approx(torch.tensor([1.0, 3.0, 5.0, 7.0]).var().item())


def test_masked_var_raises_when_undefined():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros(2, 3))
    one_entry = torch.zeros(2, 3)
    one_entry[0, 0] = 1
    with pytest.raises(ValueError):
        masked_var(x, one_entry)
    assert masked_var(x, one_entry, unbiased=False).item() == 0.0


def test_masked_whiten_ignores_masked_entries_and_normalises_valid_ones():
    torch.manual_seed(1)
    x = 3.0 + 2.0 * torch.randn(5, 9, dtype=torch.float64)
    mask = prefix_mask([9, 4, 0, 7, 1], 9)
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).abs().item() < 1e-10
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.all(whitened[~mask] == 0)

    perturbed = x.clone()
    perturbed[~mask] = torch.randn(int((~mask).sum()), dtype=torch.float64) * 100
    assert torch.equal(masked_whiten(perturbed, mask), whitened)

    kept_mean = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept_mean, mask).item() == pytest.approx(masked_mean(x, mask).item())


def test_whiten_with_stats_from_per_rank_moments_matches_masked_whiten():
    torch.manual_seed(2)
    x = torch.randn(6, 8, dtype=torch.float64) * 1.5 + 0.7
    mask = prefix_mask([8, 3, 5, 0, 8, 2], 8)
    ranks = [(x[:2], mask[:2]), (x[2:5], mask[2:5]), (x[5:], mask[5:])]
    moments = [masked_moments(rank_x, rank_mask) for rank_x, rank_mask in ranks]
    total, total_sq, count = (sum(parts) for parts in zip(*moments))  # what an all-reduce SUM gives
    assert count.item() == mask.sum().item()

    mean, var = mean_var_from_moments(total, total_sq, count)
    assert mean.item() == pytest.approx(masked_mean(x, mask).item())
    assert var.item() == pytest.approx(masked_var(x, mask).item())

    expected = masked_whiten(x, mask)
    for start, (rank_x, rank_mask) in zip((0, 2, 5), ranks):
        rank_whitened = whiten_with_stats(rank_x, mean, var, mask=rank_mask)
        assert torch.allclose(rank_whitened, expected[start : start + len(rank_x)], atol=1e-10)

    biased_mean, biased_var = mean_var_from_moments(total, total_sq, count, unbiased=False)
    assert biased_var.item() == pytest.approx(masked_var(x, mask, unbiased=False).item())
    assert biased_mean.item() == pytest.approx(mean.item())


def test_whiten_with_stats_hand_values():
    x = torch.tensor([1.0, 3.0])
    mean, var = torch.tensor(2.0), torch.tensor(4.0)
    assert torch.allclose(whiten_with_stats(x, mean, var, eps=0.0), torch.tensor([-0.5, 0.5]))
    assert torch.allclose(whiten_with_stats(x, mean, var, shift_mean=False, eps=0.0), torch.tensor([1.5, 2.5]))


# ---------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logprob = torch.tensor([-1.0, -2.0, -0.5])
    ref_logprob = torch.tensor([-2.0, -1.0, -0.5])
    # log r = ref - logprob = [-1, 1, 0]
    assert torch.allclose(kl_estimate(logprob, ref_logprob, estimator="k1"), torch.tensor([1.0, -1.0, 0.0]))
    assert torch.allclose(kl_estimate(logprob, ref_logprob, estimator="k2"), torch.tensor([0.5, 0.5, 0.0]))
    expected_k3 = torch.tensor([math.exp(-1) - 1 + 1, math.e - 1 - 1, 0.0])
    assert torch.allclose(kl_estimate(logprob, ref_logprob, estimator="k3"), expected_k3)


def test_k3_nonnegative_and_unbiased_estimators_average_to_exact_kl():
    torch.manual_seed(3)
    assert torch.all(kl_estimate(torch.randn(10_000) * 3, torch.randn(10_000) * 3, estimator="k3") >= 0)

    policy = Categorical(logits=torch.randn(6, dtype=torch.float64))
    reference = Categorical(logits=torch.randn(6, dtype=torch.float64))
    samples = policy.sample((200_000,))
    logprob, ref_logprob = policy.log_prob(samples), reference.log_prob(samples)
    true_kl = kl_divergence(policy, reference).item()
    for estimator in ("k1", "k3"):
        assert kl_estimate(logprob, ref_logprob, estimator=estimator).mean().item() == pytest.approx(true_kl, abs=0.01)


def test_kl_estimate_unknown_estimator_names_valid_options():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(torch.zeros(2), torch.zeros(2), estimator="k4")


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_exact_kl_matches_torch_distributions(direction):
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 11, dtype=torch.float64) * 2
    ref_logits = torch.randn(2, 5, 11, dtype=torch.float64) * 2
    policy, reference = Categorical(logits=logits), Categorical(logits=ref_logits)
    expected = kl_divergence(policy, reference) if direction == "reverse" else kl_divergence(reference, policy)
    result = exact_kl(logits, ref_logits, direction=direction)
    assert result.shape == (2, 5)
    assert torch.allclose(result, expected)
    assert torch.all(result >= -1e-12)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_exact_kl_gradient_flows_into_logits_only(direction):
    torch.manual_seed(5)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    ref_logits = torch.randn(2, 3, 7, requires_grad=True)
    exact_kl(logits, ref_logits, direction=direction).sum().backward()
    assert ref_logits.grad is None
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_exact_kl_is_zero_for_identical_distributions_and_rejects_unknown_direction():
    logits = torch.randn(1, 2, 5)
    assert torch.allclose(exact_kl(logits, logits + 3.0), torch.zeros(1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="reverse, forward"):
        exact_kl(logits, logits, direction="sideways")


# ---------------------------------------------------------------- log-probs and entropy


def test_logprobs_from_logits_matches_log_softmax_gather():
    torch.manual_seed(6)
    logits = torch.randn(3, 4, 13, dtype=torch.float64) * 5
    labels = torch.randint(0, 13, (3, 4))
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = torch.tensor(
        [[log_probs[b, t, labels[b, t]].item() for t in range(4)] for b in range(3)], dtype=torch.float64
    )
    assert torch.allclose(logprobs_from_logits(logits, labels), expected)


def test_entropy_from_logits_matches_categorical():
    torch.manual_seed(7)
    logits = torch.randn(3, 4, 13, dtype=torch.float64) * 5
    assert torch.allclose(entropy_from_logits(logits), Categorical(logits=logits).entropy())
    uniform = torch.zeros(1, 1, 8)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(8))


# ---------------------------------------------------------------- GAE


def naive_token_gae(rewards, values, mask, next_values, dones, gamma_token, gamma_turn, lam):
    batch, num_tokens = rewards.shape
    advantages = torch.zeros(batch, num_tokens, dtype=torch.float64)
    for b in range(batch):
        length = int(mask[b].sum())
        advantage_ahead = 0.0
        for t in reversed(range(length)):
            if t == length - 1:
                value_next = 0.0 if dones[b] else gamma_turn * float(next_values[b])
                advantage_ahead = 0.0
            else:
                value_next = gamma_token * float(values[b, t + 1])
            delta = float(rewards[b, t]) + value_next - float(values[b, t])
            advantage_ahead = delta + gamma_token * lam * advantage_ahead
            advantages[b, t] = advantage_ahead
    returns = (advantages + values) * mask
    return advantages, returns


def test_gae_hand_computed_example():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    kwargs = dict(gamma_token=0.9, gamma_turn=0.8, lam=0.5)

    # Bootstrapped: delta_1 = 1 + 0.8 * 2 - 0.4 = 2.2; A_0 = (0.9 * 0.4 - 0.5) + 0.9 * 0.5 * 2.2 = 0.85.
    advantages, returns = gae_advantages(rewards, values, mask, torch.tensor([2.0]), torch.tensor([False]), **kwargs)
    assert torch.allclose(advantages, torch.tensor([[0.85, 2.2, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[1.35, 2.6, 0.0]]))

    # Terminated: delta_1 = 1 - 0.4 = 0.6; A_0 = -0.14 + 0.45 * 0.6 = 0.13.
    advantages, returns = gae_advantages(rewards, values, mask, torch.tensor([2.0]), torch.tensor([True]), **kwargs)
    assert torch.allclose(advantages, torch.tensor([[0.13, 0.6, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.63, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma_token,gamma_turn,lam", [(1.0, 1.0, 1.0), (0.97, 0.8, 0.95), (0.5, 0.99, 0.0)])
def test_gae_matches_naive_loop(gamma_token, gamma_turn, lam):
    torch.manual_seed(8)
    lengths = [6, 3, 0, 1, 6, 4]
    batch, num_tokens = len(lengths), 6
    mask = prefix_mask(lengths, num_tokens).double()
    rewards = torch.randn(batch, num_tokens, dtype=torch.float64)
    values = torch.randn(batch, num_tokens, dtype=torch.float64)
    next_values = torch.randn(batch, dtype=torch.float64)
    dones = torch.tensor([False, True, False, True, True, False])

    advantages, returns = gae_advantages(
        rewards, values, mask, next_values, dones, gamma_token=gamma_token, gamma_turn=gamma_turn, lam=lam
    )
    expected_advantages, expected_returns = naive_token_gae(
        rewards, values, mask, next_values, dones, gamma_token, gamma_turn, lam
    )
    assert torch.allclose(advantages, expected_advantages)
    assert torch.allclose(returns, expected_returns)
    assert torch.all(advantages[2] == 0) and torch.all(returns[2] == 0)

    float_dones = gae_advantages(
        rewards, values, mask, next_values, dones.double(), gamma_token=gamma_token, gamma_turn=gamma_turn, lam=lam
    )
    assert torch.allclose(float_dones[0], advantages)


def test_gae_ignores_padding_and_next_value_of_terminated_turns():
    torch.manual_seed(9)
    mask = prefix_mask([4, 2], 5)
    rewards, values = torch.randn(2, 5), torch.randn(2, 5)
    next_values, dones = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    kwargs = dict(gamma_token=0.9, gamma_turn=0.8, lam=0.7)
    advantages, returns = gae_advantages(rewards, values, mask, next_values, dones, **kwargs)

    noisy_rewards, noisy_values = rewards.clone(), values.clone()
    noisy_rewards[~mask], noisy_values[~mask] = float("nan"), float("inf")
    noisy_next_values = torch.tensor([float("nan"), 2.0])
    noisy = gae_advantages(noisy_rewards, noisy_values, mask, noisy_next_values, dones, **kwargs)
    assert torch.equal(noisy[0], advantages) and torch.equal(noisy[1], returns)


def naive_turn_gae(rewards, values, mask, next_values, dones, truncateds, gamma, lam):
    num_segments, num_turns = rewards.shape
    advantages = torch.zeros(num_segments, num_turns, dtype=torch.float64)
    for n in range(num_segments):
        advantage_ahead = 0.0
        for turn in reversed(range(num_turns)):
            if not mask[n, turn]:
                advantage_ahead = 0.0
                continue
            bootstrap = 0.0 if dones[n, turn] else gamma * float(next_values[n, turn])
            delta = float(rewards[n, turn]) + bootstrap - float(values[n, turn])
            episode_goes_on = not dones[n, turn] and not truncateds[n, turn]
            advantage_ahead = delta + (gamma * lam * advantage_ahead if episode_goes_on else 0.0)
            advantages[n, turn] = advantage_ahead
    return advantages, (advantages + values) * mask


def test_turn_gae_matches_naive_loop_with_dones_and_truncations_in_the_middle():
    torch.manual_seed(10)
    num_segments, num_turns = 4, 7
    mask = prefix_mask([7, 5, 0, 3], num_turns)
    rewards = torch.randn(num_segments, num_turns, dtype=torch.float64)
    values = torch.randn(num_segments, num_turns, dtype=torch.float64)
    next_values = torch.randn(num_segments, num_turns, dtype=torch.float64)
    dones = torch.zeros(num_segments, num_turns, dtype=torch.bool)
    dones[0, 2] = dones[0, 6] = dones[1, 1] = True
    truncateds = torch.zeros(num_segments, num_turns, dtype=torch.bool)
    truncateds[0, 4] = truncateds[3, 0] = True

    advantages, returns = turn_gae(rewards, values, mask, next_values, dones, truncateds, gamma=0.9, lam=0.8)
    expected = naive_turn_gae(rewards, values, mask, next_values, dones, truncateds, 0.9, 0.8)
    assert torch.allclose(advantages, expected[0])
    assert torch.allclose(returns, expected[1])
    assert torch.all(advantages[2] == 0)

    no_truncation = torch.zeros_like(truncateds)
    advantages, returns = turn_gae(rewards, values, mask, next_values, dones.double(), gamma=0.9, lam=0.8)
    expected = naive_turn_gae(rewards, values, mask, next_values, dones, no_truncation, 0.9, 0.8)
    assert torch.allclose(advantages, expected[0])
    assert torch.allclose(returns, expected[1])


def test_turn_gae_hand_computed_example():
    # Two turns, terminated at the second: delta_1 = 1 - 0.5 = 0.5, delta_0 = 0 + 0.9 * 0.5 - 0.2 = 0.25,
    # A_0 = 0.25 + 0.9 * 0.5 * 0.5 = 0.475.
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.2, 0.5]])
    next_values = torch.tensor([[0.5, float("nan")]])
    dones = torch.tensor([[0.0, 1.0]])
    advantages, returns = turn_gae(rewards, values, torch.ones(1, 2), next_values, dones, gamma=0.9, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.475, 0.5]]))
    assert torch.allclose(returns, torch.tensor([[0.675, 1.0]]))


# ---------------------------------------------------------------- critic-free advantages


def naive_group_normalized(values: list[float], groups: list, scale: bool = True) -> list[float]:
    """GRPO's normalization, one member at a time: minus its group's mean, over the group's unbiased std + 1e-6;
    0 alone in its group."""
    out = []
    for value, group in zip(values, groups):
        members = [v for v, g in zip(values, groups) if g == group]
        if len(members) < 2:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((v - mean) ** 2 for v in members) / (len(members) - 1))
        out.append((value - mean) / (std + 1e-6) if scale else value - mean)
    return out


@pytest.mark.parametrize("scale", [True, False])
def test_group_relative_advantages_match_naive_loop(scale):
    torch.manual_seed(20)
    returns = torch.randn(11, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 0])
    expected = naive_group_normalized(returns.tolist(), groups.tolist(), scale)
    assert group_relative_advantages(returns, groups, scale=scale).tolist() == pytest.approx(expected)


def test_rloo_advantages_match_naive_loop_and_hand_values():
    torch.manual_seed(21)
    returns = torch.randn(10, dtype=torch.float64)
    groups = torch.tensor([2, 0, 2, 1, 0, 2, 1, 1, 1, 5])  # group 5: one episode alone
    expected = []
    for i, group in enumerate(groups.tolist()):
        others = [float(returns[j]) for j in range(len(returns)) if j != i and int(groups[j]) == group]
        expected.append(float(returns[i]) - sum(others) / len(others) if others else 0.0)
    assert rloo_advantages(returns, groups).tolist() == pytest.approx(expected)
    # By hand: group 0 = (1, 2, 6): 1 - 4 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; group 1 = (3, 5): -2, 2; 7 alone: 0.
    hand = rloo_advantages(torch.tensor([1.0, 3.0, 2.0, 5.0, 6.0, 7.0]), torch.tensor([0, 1, 0, 1, 0, 9]))
    assert hand.tolist() == pytest.approx([-3.0, -2.0, -1.5, 2.0, 4.5, 0.0])


def test_discounted_returns_match_naive_loop_with_interleaved_episodes():
    torch.manual_seed(22)
    episodes = torch.tensor([3, 0, 3, 1, 0, 3, 0, 0, 7, 3])  # turn-major: episodes interleave; 7: one turn
    rewards = torch.randn(len(episodes), dtype=torch.float64)
    for gamma in (0.0, 0.9, 1.0):
        expected = [0.0] * len(rewards)
        ahead: dict[int, float] = {}
        for i in reversed(range(len(rewards))):
            episode = int(episodes[i])
            ahead[episode] = float(rewards[i]) + gamma * ahead.get(episode, 0.0)
            expected[i] = ahead[episode]
        assert discounted_returns(rewards, episodes, gamma=gamma).tolist() == pytest.approx(expected)
    # By hand: episode 0 earns 1, 0, 2 (R = 1 + 0.5 * 0 + 0.25 * 2 = 1.5, then 0 + 0.5 * 2 = 1, then 2); episode 1: 4.
    hand = discounted_returns(torch.tensor([1.0, 4.0, 0.0, 2.0]), torch.tensor([0, 1, 0, 0]), gamma=0.5)
    assert hand.tolist() == pytest.approx([1.5, 4.0, 1.0, 2.0])


def naive_gigpo(rewards, episodes, groups, states, gamma, step_weight, scale=True):
    """GiGPO turn by turn: episode returns normalized within groups, discounted turn returns normalized within the
    turns of a group that share a state."""
    rewards, episodes, groups, states = (x.tolist() for x in (rewards, episodes, groups, states))
    episode_list = sorted(set(episodes))
    episode_returns = [sum(r for r, e in zip(rewards, episodes) if e == episode) for episode in episode_list]
    episode_groups = [groups[episodes.index(episode)] for episode in episode_list]
    episode_advantage = dict(zip(episode_list, naive_group_normalized(episode_returns, episode_groups, scale)))
    turn_returns = []
    for i, episode in enumerate(episodes):
        later = [k for k in range(i, len(rewards)) if episodes[k] == episode]
        turn_returns.append(sum(gamma ** n * rewards[k] for n, k in enumerate(later)))
    step_advantage = naive_group_normalized(turn_returns, list(zip(groups, states)), scale)
    return [episode_advantage[e] + step_weight * s for e, s in zip(episodes, step_advantage)]


@pytest.mark.parametrize("scale", [True, False])
def test_group_in_group_advantages_match_naive_loop(scale):
    torch.manual_seed(23)
    # 3 groups of 2-3 episodes of 1-5 turns, turn-major; few states, so that step groups form, some across groups
    # (the same state id in two groups must not pool: another game).
    lengths = {0: 5, 1: 3, 2: 1, 3: 4, 4: 4, 5: 2, 6: 3}
    group_of = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2}
    episodes = [e for t in range(5) for e in lengths if t < lengths[e]]
    episodes = torch.tensor(episodes) * 10  # ids need not be 0..E-1
    groups = torch.tensor([group_of[int(e) // 10] for e in episodes])
    states = torch.randint(0, 3, (len(episodes),))
    rewards = torch.randn(len(episodes), dtype=torch.float64)
    advantages = group_in_group_advantages(rewards, episodes, groups, states, gamma=0.8, step_weight=0.7, scale=scale)
    expected = naive_gigpo(rewards, episodes, groups, states, 0.8, 0.7, scale)
    assert advantages.tolist() == pytest.approx(expected)


def test_group_in_group_advantages_hand_example():
    """One group of two episodes from the same start s0: A goes east (reward 0, to room s1) and takes the coin (1);
    B looks (0, still in s0), goes east (0) and takes the coin (1). Turn-major: A1 B1 A2 B2 B3, states s0 s0 s1 s0 s1.
      episode level: returns 1 and 1, advantages 0;
      step level, gamma 0.5: turn returns A1 0.5, A2 1, B1 0.25, B2 0.5, B3 1. Step group s0 = {A1, B1, B2}: mean
      5/12, centered 1/12, -2/12, 1/12, unbiased std sqrt((1 + 4 + 1) / 144 / 2) = sqrt(3) / 12; step group
      s1 = {A2, B3}: equal returns, 0."""
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # turn-major: A1 B1 A2 B2 B3
    episodes = torch.tensor([0, 1, 0, 1, 1])
    groups = torch.zeros(5, dtype=torch.long)
    states = torch.tensor([0, 0, 1, 0, 1])
    unscaled = group_in_group_advantages(rewards, episodes, groups, states, gamma=0.5, step_weight=2.0, scale=False)
    assert unscaled.tolist() == pytest.approx([2 / 12, -4 / 12, 0.0, 2 / 12, 0.0])
    scaled = group_in_group_advantages(rewards, episodes, groups, states, gamma=0.5, step_weight=1.0)
    std = math.sqrt(3) / 12
    assert scaled.tolist() == pytest.approx([1 / 12 / std, -2 / 12 / std, 0.0, 1 / 12 / std, 0.0], rel=1e-4)
    # Only the episode level when no state repeats; with rewards 1 and 0 it is GRPO's +-1/sqrt(2).
    alone = group_in_group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 1]), torch.tensor([0, 0]),
                                      torch.tensor([0, 1]), gamma=0.5, step_weight=1.0)
    assert alone.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], abs=1e-5)


# ---------------------------------------------------------------- PPO losses


def test_policy_loss_clipping_hand_example():
    clip_range = 0.2
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0, 30.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_(True)

    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=clip_range)
    # Per token: max(-1.5, -1.2), max(-0.5, -0.8), max(0.5, 0.8), max(1.5, 1.2), max(-1, -1).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5 - 1.0) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)
    expected_kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 1.5, 1.0)) / 5
    assert stats["approx_kl"].item() == pytest.approx(expected_kl)
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())

    loss.backward()
    # d/dlogprob of -A * ratio is -A * ratio / n where unclipped; clipped tokens (0, 2) and padding get 0.
    expected_grad = torch.tensor([[0.0, -0.5, 0.0, 1.5, -1.0, 0.0]], dtype=torch.float64) / 5
    assert torch.allclose(logprobs.grad, expected_grad)



@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_candidate_ppo_loss_hand_example(direction):
    # Turn 0: pi = (1/2, 1/4, 1/4), chose 0 with behaviour prob 1/4: ratio 2, A = 1, clipped to -1.2.
    # Turn 1: pi = (0.8, 0.2) and a padded slot (NaN, never read), chose 1 with behaviour prob 0.2: ratio 1, A = -2: 2.
    probabilities = torch.tensor([[0.5, 0.25, 0.25], [0.8, 0.2, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    logprobs = probabilities.log().requires_grad_(True)
    ref = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 7.0]], dtype=torch.float64).log()
    values = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    loss, stats = candidate_ppo_loss(
        logprobs, mask, torch.tensor([0, 1]), torch.tensor([0.25, 0.2], dtype=torch.float64).log(), values,
        torch.tensor([0.5, 0.0], dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0], dtype=torch.float64), clip_range=0.2, clip_range_value=0.2, vf_coef=0.5,
        ent_coef=0.1, ref_logprobs=ref, kl_loss_coef=0.3, kl_direction=direction,
    )
    policy = (-1.2 + 2.0) / 2
    # Value 1.0 from old 0.5 clips to 0.7: max((1 - 2)^2, (0.7 - 2)^2) = 1.69; turn 1: (0 - 1)^2 = 1.
    value = 0.5 * (1.69 + 1.0) / 2
    entropy = (1.5 * math.log(2) - (0.8 * math.log(0.8) + 0.2 * math.log(0.2))) / 2
    pi, q = [[0.5, 0.25, 0.25], [0.8, 0.2]], [[1 / 3] * 3, [0.5, 0.5]]
    if direction == "forward":
        pi, q = q, pi
    kl = sum(sum(a * math.log(a / b) for a, b in zip(p_row, q_row)) for p_row, q_row in zip(pi, q)) / 2
    assert stats["policy_loss"].item() == pytest.approx(policy)
    assert stats["value_loss"].item() == pytest.approx(value)
    assert stats["entropy"].item() == pytest.approx(entropy)
    assert stats["kl_loss"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(policy + 0.5 * value - 0.1 * entropy + 0.3 * kl)
    assert stats["clipfrac"].item() == pytest.approx(0.5) and stats["value_clipfrac"].item() == pytest.approx(0.5)
    assert stats["approx_kl"].item() == pytest.approx((1 - math.log(2)) / 2)

    loss.backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[1, 2] == 0  # padding: no gradient, no NaN
    assert logprobs.grad[1, 1] != 0  # the chosen command of the unclipped turn
    # Without a reference and with ent_coef 0 only the chosen log-prob matters, and only where unclipped.
    logprobs.grad = None
    loss, stats = candidate_ppo_loss(
        logprobs, mask, torch.tensor([0, 1]), torch.tensor([0.25, 0.2], dtype=torch.float64).log(), values.detach(),
        values.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64), values.detach(), clip_range=0.2,
        clip_range_value=0.2, vf_coef=0.5, ent_coef=0.0,
    )
    loss.backward()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[1, 1] = 2.0 * 1.0 / 2  # d/dlogprob of -A * ratio at ratio 1, averaged over 2 turns
    assert torch.allclose(logprobs.grad, expected) and stats["kl_loss"] == 0


def test_value_only_losses_are_the_value_term_alone_and_leave_the_policy_without_gradient():
    """A value warm-up iteration: loss = vf_coef * value_loss, no gradient reaches the logits or log-probs (the
    entropy and exact-KL terms are on too), and the stats still report the policy's figures."""
    torch.manual_seed(30)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    labels, mask = torch.randint(0, 5, (2, 3)), prefix_mask([3, 2], 3)
    per_token = [torch.randn(2, 3, dtype=torch.float64) for _ in range(4)]  # old log-probs, old values, A, R
    options = {"clip_range": 0.2, "clip_range_value": 0.2, "vf_coef": 0.7, "ent_coef": 0.1, "kl_loss_coef": 0.3}
    ref_logits = torch.randn(2, 3, 5, dtype=torch.float64)
    full, full_stats = ppo_loss(logits, values, labels, mask, *per_token, ref_logits, **options)
    loss, stats = ppo_loss(logits, values, labels, mask, *per_token, ref_logits, **options, value_only=True)
    assert loss.item() == pytest.approx(0.7 * stats["value_loss"].item())
    assert {k: v.item() for k, v in stats.items()} == pytest.approx({k: v.item() for k, v in full_stats.items()})
    loss.backward()
    assert logits.grad is None and values.grad.abs().sum() > 0

    logprobs = torch.randn(2, 4, dtype=torch.float64).log_softmax(dim=1).requires_grad_(True)
    values = torch.randn(2, dtype=torch.float64, requires_grad=True)
    per_turn = [torch.randn(2, dtype=torch.float64) for _ in range(4)]  # old log-probs, old values, A, R
    loss, stats = candidate_ppo_loss(logprobs, torch.ones(2, 4, dtype=torch.bool), torch.tensor([1, 3]), per_turn[0],
                                     values, *per_turn[1:], logprobs.detach().flip(1), **options, value_only=True)
    assert loss.item() == pytest.approx(0.7 * stats["value_loss"].item())
    assert stats["policy_loss"] != 0 and stats["entropy"] > 0
    loss.backward()
    assert logprobs.grad is None and values.grad.abs().sum() > 0


def entropy_of(p):
    return -sum(a * math.log(a) for a in p)


def kl_of(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def two_by_two_logits(probabilities, shift):
    """(2, 2, 3) logits: tokens (0, 0), (0, 1), (1, 0) have these probabilities (log + shift: softmax must
    normalise), the padded token (1, 1) garbage, finite as logits must be."""
    rows = [[math.log(a) + shift for a in p] for p in probabilities] + [[7.0, -3.0, 2.0]]
    return torch.tensor(rows, dtype=torch.float64).view(2, 2, 3)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_ppo_loss_hand_example(direction):
    """Every term of the token-level PPO loss, its coefficient and its sign, against plain-math values; the padded
    token (NaN rollout data, garbage logits) adds nothing."""
    # Three real tokens, clip_range 0.2, each term max(-A * ratio, -A * clip(ratio)):
    #   (0, 0) pi = (.5, .25, .25), label 0, behaviour prob .25: ratio 2,  A = 1:  max(-2, -1.2) = -1.2 (clipped)
    #   (0, 1) pi = (.2, .6, .2),   label 1, behaviour prob .4:  ratio 1.5, A = -2: max(3, 2.4) = 3 (unclipped)
    #   (1, 0) pi = (.1, .3, .6),   label 1, behaviour prob .6:  ratio .5,  A = -1: max(.5, .8) = .8 (clipped)
    pi = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]
    ref = [[1 / 3, 1 / 3, 1 / 3], [0.5, 0.25, 0.25], [0.2, 0.4, 0.4]]
    nan = float("nan")
    loss, stats = ppo_loss(
        two_by_two_logits(pi, 2.0),
        values=torch.tensor([[1.0, 0.0], [-0.5, nan]], dtype=torch.float64),
        labels=torch.tensor([[0, 1], [1, 2]]),
        mask=torch.tensor([[1, 1], [1, 0]], dtype=torch.bool),
        old_logprobs=torch.tensor([[0.25, 0.4], [0.6, nan]], dtype=torch.float64).log(),
        old_values=torch.tensor([[0.5, 0.1], [0.0, nan]], dtype=torch.float64),
        advantages=torch.tensor([[1.0, -2.0], [-1.0, nan]], dtype=torch.float64),
        returns=torch.tensor([[2.0, 1.0], [0.0, nan]], dtype=torch.float64),
        ref_logits=two_by_two_logits(ref, -1.0), clip_range=0.2, clip_range_value=0.2, vf_coef=0.7, ent_coef=0.05,
        kl_loss_coef=0.3, kl_direction=direction,
    )
    policy = (-1.2 + 3.0 + 0.8) / 3
    # clip_range_value 0.2: (0, 0) V 1 from old .5 clips to .7: max((1 - 2)^2, (.7 - 2)^2) = 1.69 (clipped);
    # (0, 1) V 0 from old .1 is within the range: 1; (1, 0) V -.5 from old 0 clips to -.2: max(.25, .04) = .25.
    value = 0.5 * (1.69 + 1.0 + 0.25) / 3
    entropy = sum(entropy_of(p) for p in pi) / 3
    kl = sum(kl_of(p, q) if direction == "reverse" else kl_of(q, p) for p, q in zip(pi, ref)) / 3
    assert stats["policy_loss"].item() == pytest.approx(policy)
    assert stats["value_loss"].item() == pytest.approx(value)
    assert stats["entropy"].item() == pytest.approx(entropy)
    assert stats["kl_loss"].item() == pytest.approx(kl)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["value_clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx(sum(r - 1 - math.log(r) for r in (2.0, 1.5, 0.5)) / 3)
    assert loss.item() == pytest.approx(policy + 0.7 * value - 0.05 * entropy + 0.3 * kl)


def test_loss_options_are_keyword_only():
    """Clip ranges and coefficients cannot be passed by position: a call in the old order (options right after the
    tensors) fails instead of binding the first option to the reference."""
    labels, mask = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)
    per_token = [torch.zeros(2, 3)] * 5  # values, old_logprobs, old_values, advantages, returns
    with pytest.raises(TypeError, match="positional arguments but"):
        ppo_loss(torch.zeros(2, 3, 4), per_token[0], labels, mask, *per_token[1:], 0.2, 0.2, 0.5, 0.01)
    per_turn = [torch.zeros(2)] * 5  # old_logprobs, values, old_values, advantages, returns
    with pytest.raises(TypeError, match="positional arguments but"):
        candidate_ppo_loss(torch.zeros(2, 3), mask, labels[:, 0], *per_turn, 0.2, 0.2, 0.5, 0.01)


def test_policy_loss_without_clipping_is_the_policy_gradient():
    torch.manual_seed(11)
    logprobs = torch.randn(3, 4, requires_grad=True)
    advantages = torch.randn(3, 4)
    mask = prefix_mask([4, 2, 3], 4)
    loss, stats = policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-advantages[mask].mean().item(), abs=1e-6)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_value_loss_clipping_hand_example():
    values = torch.tensor([[0.5, 0.1, -0.5, 99.0]], requires_grad=True)
    old_values = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 0.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])

    loss, stats = value_loss(values, old_values, returns, mask, clip_range_value=0.2)
    # Token 0: max(0.25, (0.2 - 1)^2 = 0.64) is clipped; token 1: 0.81 both; token 2: max(0.25, 0.04).
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert not stats["clipfrac"].requires_grad
    loss.backward()
    # 0.5 * 2 * (V - R) / n on unclipped tokens; the clipped token and padding get no gradient.
    assert torch.allclose(values.grad, torch.tensor([[0.0, -0.9, -0.5, 0.0]]) / 3)

    unclipped_loss, unclipped_stats = value_loss(values, old_values, returns, mask, clip_range_value=None)
    assert unclipped_loss.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.25) / 3)
    assert unclipped_stats["clipfrac"].item() == 0.0


def test_explained_variance():
    torch.manual_seed(12)
    returns = torch.randn(3, 5, dtype=torch.float64)
    mask = prefix_mask([5, 2, 4], 5)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)

    constant_prediction = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant_prediction, returns, mask).item() == pytest.approx(0.0, abs=1e-12)

    values = returns + 0.5 * torch.randn(3, 5, dtype=torch.float64)
    selected_returns, selected_values = returns[mask], values[mask]
    expected = 1 - (selected_returns - selected_values).var() / selected_returns.var()
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected.item())

    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


# ---------------------------------------------------------------- KL controllers


@pytest.mark.parametrize(
    "current_kl,expected_error",
    [(7.0, 7.0 / 6.0 - 1), (5.0, 5.0 / 6.0 - 1), (60.0, 0.2), (0.0, -0.2)],
)
def test_adaptive_kl_controller_update(current_kl, expected_error):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl, n_steps=256)
    assert controller.value == pytest.approx(0.1 * (1 + expected_error * 256 / 10_000))


def test_adaptive_kl_controller_hand_values_and_resume():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    controller.update(torch.tensor(7.0), n_steps=256)
    assert controller.value == pytest.approx(0.10042667, abs=1e-8)
    controller.update(3.0, n_steps=256)  # error -0.5 clipped to -0.2
    assert controller.value == pytest.approx(0.10042667 * 0.99488, abs=1e-8)

    resumed = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10_000)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == controller.value


def test_fixed_kl_controller():
    controller = FixedKLController(0.05)
    controller.update(100.0, n_steps=256)
    assert controller.value == 0.05
    resumed = FixedKLController(0.05)
    resumed.load_state_dict(controller.state_dict())
    assert resumed.value == 0.05
