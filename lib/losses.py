"""Pure tensor functions for PPO on causal language models.

Shape conventions: B = batch (one row per response / turn), T = response tokens,
V = vocabulary, N = episodes or segments, L = turns. A mask is a bool or float
tensor shaped like the data it masks, with 1 = a real response token (or turn).
Functions taking a mask never read masked positions: they may hold anything, even NaN or inf.
"""

import torch


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not x * mask: NaN or inf at masked positions would survive a product,
    # in the forward pass (0 * inf) or in the backward pass (0 * d(...)/dx).
    return torch.where(_as_bool(mask), x, torch.zeros_like(x))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dims when None). x, mask: same shape."""
    kept = _zero_masked(x, mask)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all dims when None).

    An empty selection gives 0 rather than NaN, so that a response with no valid
    tokens contributes nothing instead of poisoning a whole batch statistic.
    """
    count = masked_sum(torch.ones_like(x), mask, dim=dim).clamp(min=1)
    return masked_sum(x, mask, dim=dim) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid entries of x, a 0-d tensor.

    var = sum(mask * (x - mean)^2) / n, times n / (n - 1) when unbiased, n = sum(mask).
    Raises ValueError when n is too small for the variance to be defined.
    """
    count = int(_as_bool(mask).sum().item())
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid entries, got {count}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * count / (count - 1) if unbiased else var


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum, sum of squares, count) of the valid entries of x, each a 0-d tensor.

    For whitening across processes: all-reduce (SUM) the three numbers over ranks,
    then `mean, var = mean_var_from_moments(*reduced)` and
    `whiten_with_stats(x, mean, var, mask=mask)` on every rank. This gives the
    same result as `masked_whiten` on the concatenation of all ranks' data.
    Use float64 x when |mean| >> std: sum_sq / n - mean^2 cancels catastrophically.
    """
    return masked_sum(x, mask), masked_sum(x * x, mask), masked_sum(torch.ones_like(x), mask)


def mean_var_from_moments(
    total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor, unbiased: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn (sum, sum_sq, count) from `masked_moments` into (mean, var), 0-d tensors.

    mean = sum / n, var = sum_sq / n - mean^2, times n / (n - 1) when unbiased.
    """
    n = float(count)
    if n < (2 if unbiased else 1):
        raise ValueError(f"mean_var_from_moments needs at least {2 if unbiased else 1} entries, got {n:g}")
    mean = total / n
    # Rounding in sum_sq / n - mean^2 can make a zero variance slightly negative.
    var = (total_sq / n - mean**2).clamp(min=0)
    return mean, (var * n / (n - 1) if unbiased else var)


def whiten_with_stats(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps), with the mean added back when not shift_mean.

    mean, var: 0-d (or broadcastable) statistics, e.g. global ones from
    `masked_moments`. Masked positions of the output are 0 when mask is given.
    """
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened if mask is None else _zero_masked(whitened, mask)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten x using the mean and unbiased variance of its valid entries only.

    x, mask: same shape; the output has that shape and is 0 at masked positions.
    """
    return whiten_with_stats(x, masked_mean(x, mask), masked_var(x, mask), shift_mean=shift_mean, eps=eps, mask=mask)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprob: torch.Tensor, ref_logprob: torch.Tensor, *, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    With log r = ref_logprob - logprob (any shape, elementwise):
      k1 = -log r            unbiased, can be negative
      k2 = 0.5 * (log r)^2   biased, low variance
      k3 = (r - 1) - log r   unbiased, low variance, always >= 0
    """
    log_ratio = ref_logprob - logprob
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # expm1 keeps precision when r is close to 1, where k3 ~ (log r)^2 / 2 is tiny.
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid options: {', '.join(KL_ESTIMATORS)}")


KL_DIRECTIONS = ("reverse", "forward")


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *, direction: str = "reverse") -> torch.Tensor:
    """Analytic KL over the whole vocabulary at each position: (B, T, V) -> (B, T).

    reverse: KL(pi || ref) = sum_v pi_v (log pi_v - log ref_v)
    forward: KL(ref || pi) = sum_v ref_v (log ref_v - log pi_v)
    pi = softmax(logits), ref = softmax(ref_logits). Gradients flow into logits
    only: the reference model is a fixed anchor. Logits must be finite.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; valid options: {', '.join(KL_DIRECTIONS)}")
    log_pi = torch.log_softmax(logits, dim=-1)
    log_ref = torch.log_softmax(ref_logits.detach(), dim=-1)
    if direction == "reverse":
        return (log_pi.exp() * (log_pi - log_ref)).sum(dim=-1)
    return (log_ref.exp() * (log_ref - log_pi)).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: (B, T, V), (B, T) int -> (B, T)."""
    # Gathering before normalising avoids materialising a second (B, T, V) tensor.
    picked = logits.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (B, T, V) -> (B, T).

    H = -sum_v p_v log p_v = logsumexp(logits) - sum_v p_v * logits_v.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    next_values: torch.Tensor,
    dones: torch.Tensor,
    *,
    gamma_token: float,
    gamma_turn: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE inside each response; one row per turn.

    rewards, values, mask: (B, T), right-padded (valid tokens are a prefix of
    each row; a row may be empty). rewards already hold the per-token KL penalty
    and the turn's environment reward on the last valid token.
    next_values: (B,) value of the next turn's state; dones: (B,) 1 when the
    episode terminated at this turn (pass 0 with a real next value on truncation).

      V_next(t) = gamma_token * V[t+1]                       t before the last valid token
                = gamma_turn * next_values * (1 - dones)     t the last valid token
      delta_t   = r_t + V_next(t) - V_t
      A_t       = delta_t + gamma_token * lam * A_{t+1},     A after the last valid token = 0

    The recursion stops at the end of the response: later turns reach this turn
    only through the next-value bootstrap, not through their advantages (as in the
    original project). Inputs should be detached rollout tensors.
    Returns (advantages, returns = advantages + values), both (B, T), 0 where masked.
    """
    rewards, values = _zero_masked(rewards, mask), _zero_masked(values, mask)
    valid_f = _as_bool(mask).to(values.dtype)
    next_is_valid = torch.cat([valid_f[:, 1:], torch.zeros_like(valid_f[:, :1])], dim=1)
    is_last = valid_f * (1 - next_is_valid)
    # where, not (1 - dones) * next_values: a terminated turn may have no real next value (NaN).
    turn_bootstrap = gamma_turn * _zero_masked(next_values.to(values.dtype), ~_as_bool(dones))
    values_ahead = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)

    num_tokens = rewards.shape[1]
    advantage_ahead = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(num_tokens)):
        value_next = next_is_valid[:, t] * gamma_token * values_ahead[:, t] + is_last[:, t] * turn_bootstrap
        delta = rewards[:, t] + value_next - values[:, t]
        advantage_ahead = (delta + gamma_token * lam * next_is_valid[:, t] * advantage_ahead) * valid_f[:, t]
        advantages_reversed.append(advantage_ahead)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def turn_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    next_values: torch.Tensor,
    dones: torch.Tensor,
    truncateds: torch.Tensor | None = None,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn-level GAE where each turn is one decision; all inputs (N, L), time-ordered.

    rewards, values, next_values (value of the state after turn l), mask (1 = real
    turn), dones (1 = episode terminated at turn l), optional truncateds (1 = episode
    cut at turn l by a time limit, and a new episode may follow in the same row):

      delta_l = r_l + gamma * next_values_l * (1 - dones_l) - values_l
      A_l     = delta_l + gamma * lam * (1 - dones_l) * (1 - truncateds_l) * A_{l+1}

    with A_{l+1} = 0 when turn l+1 is masked. Truncation still bootstraps from
    next_values_l but must stop the recursion, since A_{l+1} then belongs to
    another episode. Returns (advantages, returns = advantages + values), 0 where masked.
    """
    rewards, values = _zero_masked(rewards, mask), _zero_masked(values, mask)
    # Terminated turns may have no real next value (NaN), so they are zeroed, not multiplied.
    next_values = _zero_masked(next_values, _as_bool(mask) & ~_as_bool(dones))
    valid_f = _as_bool(mask).to(values.dtype)
    not_done = 1 - dones.to(values.dtype)
    carries = not_done if truncateds is None else not_done * (1 - truncateds.to(values.dtype))
    next_is_valid = torch.cat([valid_f[:, 1:], torch.zeros_like(valid_f[:, :1])], dim=1)

    num_turns = rewards.shape[1]
    advantage_ahead = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for turn in reversed(range(num_turns)):
        delta = rewards[:, turn] + gamma * next_values[:, turn] - values[:, turn]
        advantage_ahead = (
            delta + gamma * lam * carries[:, turn] * next_is_valid[:, turn] * advantage_ahead
        ) * valid_f[:, turn]
        advantages_reversed.append(advantage_ahead)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate, averaged over all valid tokens of the batch.

    All inputs (B, T). ratio = exp(logprobs - old_logprobs),
    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).
    Stats (detached 0-d tensors): clipfrac (share of tokens where the clipped
    term wins), approx_kl = masked_mean((ratio - 1) - log ratio).
    """
    log_ratio = _zero_masked(logprobs - old_logprobs, mask)
    advantages = _zero_masked(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, averaged over all valid tokens. All inputs (B, T).

    loss = 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2));
    clip_range_value=None gives the plain 0.5 * masked_mean((V - R)^2).
    Stats (detached 0-d tensors): clipfrac (share of tokens where the clipped term wins).
    """
    values, old_values, returns = (_zero_masked(x, mask) for x in (values, old_values, returns))
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        return 0.5 * masked_mean(unclipped, mask), {"clipfrac": values.new_zeros(())}
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask)}
    return loss, stats


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over valid entries, a 0-d tensor; NaN when Var[R] == 0.

    1 = perfect prediction, 0 = no better than predicting the mean, < 0 = worse.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    return torch.where(var_returns == 0, torch.full_like(var_returns, float("nan")), 1 - var_residual / var_returns)


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences".

    error = clip(current_kl / target - 1, -max_error, max_error)
    value *= 1 + error * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float, max_error: float = 0.2):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon
        self.max_error = max_error

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -self.max_error), self.max_error)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class FixedKLController:
    """Constant KL coefficient with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


def penalized_rewards(
    kl: torch.Tensor, turn_rewards: torch.Tensor, mask: torch.Tensor, *, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards of a batch of responses: -kl_coef * kl at every valid token, plus the turn's environment
    reward on its last valid token. kl, mask: (B, T) right-padded; turn_rewards: (B,). Returns (B, T), 0 where masked.
    """
    valid = _as_bool(mask)
    rewards = _zero_masked(-kl_coef * kl, valid)
    last = (valid.long().sum(dim=1) - 1).clamp(min=0)
    on_last = torch.zeros_like(rewards).scatter(1, last[:, None], turn_rewards.to(rewards.dtype)[:, None])
    return rewards + _zero_masked(on_last, valid)


def ppo_loss(
    logits: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    clip_range: float,
    clip_range_value: float | None,
    vf_coef: float,
    ent_coef: float,
    kl_loss_coef: float = 0.0,
    kl_direction: str = "reverse",
    value_only: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective of one minibatch, averaged over all valid tokens of all its responses.

    logits (B, T, V) predict labels (B, T) (already divided by the sampling temperature); values and the other
    inputs (B, T); values None (no value head, critic-free advantages) leaves the value term out. loss = policy_loss + vf_coef * value_loss - ent_coef * entropy
                          + kl_loss_coef * masked_mean(exact_kl(logits, ref_logits, kl_direction))
    (the KL term only when ref_logits is given). value_only (a value warm-up): loss = vf_coef * value_loss alone,
    the policy's terms still in the stats but not in the loss nor its gradient. Stats: detached 0-d tensors.
    """
    logprobs = logprobs_from_logits(logits, labels)
    pg_loss, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_range=clip_range)
    vf_loss, vf_stats = _value_term(values, old_values, returns, mask, clip_range_value, pg_loss)
    # The entropy only needs a graph when it is part of the loss; (B, T, V) intermediates are the largest tensors.
    with torch.set_grad_enabled(ent_coef != 0 and torch.is_grad_enabled()):
        entropy = masked_mean(entropy_from_logits(logits), mask)
    loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy
    kl_loss = torch.zeros_like(loss)
    if ref_logits is not None:
        kl_loss = masked_mean(exact_kl(logits, ref_logits, direction=kl_direction), mask)
        loss = loss + kl_loss_coef * kl_loss
    if value_only:
        loss = vf_coef * vf_loss
    return loss, _loss_stats(pg_loss, vf_loss, entropy, kl_loss, pg_stats, vf_stats)


def _value_term(values, old_values, returns, mask, clip_range_value, like: torch.Tensor):
    """value_loss, or a zero term without values (critic-free advantages: no value head)."""
    if values is None:
        return like.new_zeros(()), {"clipfrac": like.new_zeros(())}
    return value_loss(values, old_values, returns, mask, clip_range_value=clip_range_value)


def _loss_stats(pg_loss, vf_loss, entropy, kl_loss, pg_stats: dict, vf_stats: dict) -> dict:
    """The detached figures both PPO losses report (the same keys, so the trainer logs either the same way)."""
    return {
        "policy_loss": pg_loss.detach(),
        "value_loss": vf_loss.detach(),
        "entropy": entropy.detach(),
        "kl_loss": kl_loss.detach(),
        "approx_kl": pg_stats["approx_kl"],
        "clipfrac": pg_stats["clipfrac"],
        "value_clipfrac": vf_stats["clipfrac"],
    }


def candidate_ppo_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    chosen: torch.Tensor,
    old_logprobs: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    *,
    clip_range: float,
    clip_range_value: float | None,
    vf_coef: float,
    ent_coef: float,
    kl_loss_coef: float = 0.0,
    kl_direction: str = "reverse",
    value_only: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective at turn level (score mode): one decision per turn, a choice among the state's candidates.

    logprobs, mask (N, K): the policy's log-probabilities over each turn's candidates (log softmax of the scores over
    the mask's candidates; padding unread); chosen (N,) int: the candidate taken; old_logprobs (N,): its behaviour
    log-prob; values, old_values, advantages, returns (N,) (values None: no value term). ref_logprobs (N, K): the reference's log-probs over the
    same candidates. loss = policy_loss(chosen) + vf_coef * value_loss - ent_coef * H(pi)
                            + kl_loss_coef * KL(pi || ref) (or KL(ref || pi) when forward), KL and H exact over the
    candidates; every term averaged over the turns. value_only: vf_coef * value_loss alone, as in ppo_loss. Stats:
    those of ppo_loss.
    """
    turns = torch.ones_like(old_logprobs, dtype=torch.bool)[:, None]  # each turn: a one-token response
    chosen_logprobs = logprobs.gather(1, chosen[:, None])
    pg_loss, pg_stats = policy_loss(chosen_logprobs, old_logprobs[:, None], advantages[:, None], turns, clip_range=clip_range)
    if values is not None:
        values, old_values, returns = values[:, None], old_values[:, None], returns[:, None]
    vf_loss, vf_stats = _value_term(values, old_values, returns, turns, clip_range_value, pg_loss)
    logprobs = _zero_masked(logprobs, mask)
    probabilities = _zero_masked(logprobs.exp(), mask)
    entropy = -masked_sum(probabilities * logprobs, mask, dim=1).mean()
    loss = pg_loss + vf_coef * vf_loss - ent_coef * entropy
    kl_loss = torch.zeros_like(loss)
    if ref_logprobs is not None:
        if kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"unknown KL direction {kl_direction!r}; valid options: {', '.join(KL_DIRECTIONS)}")
        ref_logprobs = _zero_masked(ref_logprobs.detach(), mask)
        if kl_direction == "reverse":
            kl = masked_sum(probabilities * (logprobs - ref_logprobs), mask, dim=1)
        else:
            kl = masked_sum(ref_logprobs.exp() * (ref_logprobs - logprobs), mask, dim=1)
        kl_loss = kl.mean()
        loss = loss + kl_loss_coef * kl_loss
    if value_only:
        loss = vf_coef * vf_loss
    return loss, _loss_stats(pg_loss, vf_loss, entropy, kl_loss, pg_stats, vf_stats)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    ref_logits: torch.Tensor | None = None,
    *,
    kl_coef: float = 0.0,
    kl_direction: str = "reverse",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning on answer tokens only, averaged over the valid tokens of the batch.

    logits (B, T, V) predict labels (B, T); mask (B, T) is 1 on the answer tokens to learn and 0 on prompt tokens and
    padding, which then add nothing to the loss or its gradient. loss = masked_mean(-log softmax(logits)[label])
    (+ kl_coef * masked_mean(exact_kl(logits, ref_logits, kl_direction)) when ref_logits is given, to stay near a
    reference). Stats (detached 0-d tensors): nll, kl (0 without ref_logits), accuracy (greedy token = label).
    """
    nll = masked_mean(-logprobs_from_logits(logits, labels), mask)
    kl = torch.zeros_like(nll)
    if ref_logits is not None:
        kl = masked_mean(exact_kl(logits, ref_logits, direction=kl_direction), mask)
    loss = nll + kl_coef * kl
    with torch.no_grad():
        accuracy = masked_mean((logits.argmax(dim=-1) == labels).to(nll.dtype), mask)
    return loss, {"nll": nll.detach(), "kl": kl.detach(), "accuracy": accuracy}


def group_relative_advantages(
    returns: torch.Tensor, group_ids: torch.Tensor, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Critic-free advantages of GRPO (Shao et al. 2024, DeepSeekMath): each episode against the other episodes of
    its group (G episodes played from the same start with different samples).

    returns (N,): one return per episode; group_ids (N,) int: its group. Returns (N,):
      A_i = (R_i - mean_g R) / (std_g R + eps)     with scale (std: unbiased, as TRL computes it)
      A_i =  R_i - mean_g R                        without scale (Dr. GRPO, Liu et al. 2025)
    A group of one episode has no baseline to compare with: its advantage is 0.
    """
    advantages = torch.zeros_like(returns)
    for group in torch.unique(group_ids):
        members = group_ids == group
        if int(members.sum()) < 2:
            continue
        centered = returns[members] - returns[members].mean()
        advantages[members] = centered / (returns[members].std() + eps) if scale else centered
    return advantages


def rloo_advantages(returns: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Critic-free advantages of RLOO (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024): each
    episode against the mean of the OTHER episodes of its group.

    returns (N,): one return per episode; group_ids (N,) int: its group. Returns (N,):
      A_i = R_i - mean_{j in g, j != i} R_j = G / (G - 1) * (R_i - mean_g R)     G: the group's size
    No scaling by a standard deviation: the baseline does not depend on the episode itself, so the estimate stays
    unbiased. A group of one episode has no other episode to compare with: its advantage is 0 (as in
    group_relative_advantages), not an error, so a batch may hold one.
    """
    advantages = torch.zeros_like(returns)
    for group in torch.unique(group_ids):
        members = group_ids == group
        size = int(members.sum())
        if size < 2:
            continue
        advantages[members] = size / (size - 1) * (returns[members] - returns[members].mean())
    return advantages


def discounted_returns(rewards: torch.Tensor, episode_ids: torch.Tensor, *, gamma: float) -> torch.Tensor:
    """Each turn's discounted return from that turn to its episode's end: R_t = sum_{k >= t} gamma^(k - t) r_k.

    rewards (L,): one reward per turn; episode_ids (L,) int: its episode. The turns of one episode are in time order
    (episodes may interleave, as a rollout lists its slots' turns turn by turn). Returns (L,).
    """
    returns = torch.zeros_like(rewards)
    for episode in torch.unique(episode_ids):
        turns = (episode_ids == episode).nonzero()[:, 0]
        steps = torch.arange(len(turns), dtype=rewards.dtype, device=rewards.device)
        # discounts[t, k] = gamma^(k - t) for k >= t, else 0 (triu drops the k < t powers, inf when gamma is 0)
        discounts = torch.pow(gamma, steps[None, :] - steps[:, None]).triu()
        returns[turns] = discounts @ rewards[turns]
    return returns


def group_in_group_advantages(
    rewards: torch.Tensor,
    episode_ids: torch.Tensor,
    group_ids: torch.Tensor,
    state_ids: torch.Tensor,
    *,
    gamma: float,
    step_weight: float,
    scale: bool = True,
) -> torch.Tensor:
    """Critic-free advantages of GiGPO (Feng et al. 2025, "Group-in-Group Policy Optimization for LLM Agent
    Training"): GRPO's episode-level advantage plus a step-level one that compares the turns taken from the same
    state.

    rewards, episode_ids, group_ids, state_ids (L,): per turn its reward, its episode, its episode's group (the
    episodes played from the same start) and its state before the turn (equal ids: the same environment state);
    the turns of one episode in time order. Returns (L,):
      A_t = A^E(episode of t) + step_weight * A^S(t)
      A^E: group_relative_advantages of the episodes' returns (rewards summed, undiscounted) within their groups;
      A^S: group_relative_advantages of the turns' discounted returns (discounted_returns, gamma) within their step
           group: the turns of one group whose state ids are equal (a state several episodes, or one episode twice,
           passed through). A state met once has no other turn to compare with: A^S = 0.
    `scale` as in group_relative_advantages, for both levels.
    """
    episodes, episode_of = torch.unique(episode_ids, return_inverse=True)
    episode_returns = torch.zeros(len(episodes), dtype=rewards.dtype).index_add_(0, episode_of, rewards)
    episode_groups = torch.zeros(len(episodes), dtype=group_ids.dtype).scatter_(0, episode_of, group_ids)
    episode_level = group_relative_advantages(episode_returns, episode_groups, scale=scale)[episode_of]
    _, step_group_ids = torch.unique(torch.stack([group_ids, state_ids], dim=1), dim=0, return_inverse=True)
    turn_returns = discounted_returns(rewards, episode_ids, gamma=gamma)
    step_level = group_relative_advantages(turn_returns, step_group_ids, scale=scale)
    return episode_level + step_weight * step_level
