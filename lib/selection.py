"""Which played episodes (or turns) rejection sampling keeps: ranking by value and the keep rules. Pure Python.

A candidate is an episode (value: its return) or a turn (value: its discounted return-to-go), optionally minus a KL
penalty; the caller computes the values. Candidates are ranked best first; equal values (to 9 decimals, so that
float noise of sums in another order, 0.1 + 0.2 against 0.3, does not decide) keep the caller's order: the earlier
candidate ranks higher, so the same values always give the same ranks and the same kept set.

Keep rules (`select`): the top `keep_top_n` candidates, or the top `keep_top_percent` percent of them (rounded up, so
any positive percent of a non-empty set keeps at least one), optionally only those whose value is above
`min_return`; or `min_return` alone: every candidate above it.
"""

import math
from dataclasses import dataclass


def returns_to_go(rewards: list[float], gamma: float) -> list[float]:
    """G_t = r_t + gamma * G_{t+1} for the turns of one episode, in order; G after the last turn is 0."""
    returns, ahead = [], 0.0
    for reward in reversed(rewards):
        ahead = reward + gamma * ahead
        returns.append(ahead)
    return returns[::-1]


@dataclass
class Selection:
    """Per candidate, in the caller's order: its rank (1 = best) and whether it is kept; `note` says when a rule
    could not be applied as asked (more asked than there are candidates), else None."""

    ranks: list[int]
    kept: list[bool]
    note: str | None = None

    @property
    def num_kept(self) -> int:
        return sum(self.kept)


def top_count(num_candidates: int, keep_top_percent: float) -> int:
    """How many candidates `keep_top_percent` (in (0, 100]) keeps: the share rounded up."""
    # round() first: 100/11 percent of 11 candidates is 1.0000000000000002 in floats, and must keep 1, not 2.
    return math.ceil(round(num_candidates * keep_top_percent / 100, 9))


def select(
    values: list[float],
    keep_top_percent: float | None = None,
    keep_top_n: int | None = None,
    min_return: float | None = None,
) -> Selection:
    """Rank `values` (higher is better) and keep by the rules in the module docstring (at least one rule given;
    not both top rules)."""
    if keep_top_percent is not None and keep_top_n is not None:
        raise ValueError("keep_top_percent and keep_top_n exclude each other")
    if keep_top_percent is None and keep_top_n is None and min_return is None:
        raise ValueError("no keep rule: give keep_top_percent, keep_top_n or min_return")
    values = [round(value, 9) for value in values]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    ranks = [0] * len(values)
    for rank, index in enumerate(order, start=1):
        ranks[index] = rank
    note = None
    count = len(values)
    if keep_top_n is not None:
        if keep_top_n > len(values):
            note = f"asked for the top {keep_top_n} but there are only {len(values)} candidates: keeping all of them"
        count = min(keep_top_n, len(values))
    elif keep_top_percent is not None:
        count = top_count(len(values), keep_top_percent)
    kept = [rank <= count and (min_return is None or value > min_return) for rank, value in zip(ranks, values)]
    return Selection(ranks, kept, note)
