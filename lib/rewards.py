"""The reward chain: what one environment step is worth to the learner.

`--reward` picks the components by name (comma-separated); each has its own weight flag. The total reward of a turn
is the sum of the chosen components:

  score     score_weight * (score after - score before)          the game's own reward
  win       +win_bonus when the episode was won at this step
  lose      -lose_penalty when the episode was lost at this step
  living    -living_cost every step                               pushes toward short solutions
  invalid   -invalid_penalty when the command was not admissible, or (given the state before) it changed nothing:
            same observation, inventory and score
  revisit   -revisit_penalty when the command led back to an observation already seen in the episode (a room
            left and entered again, a description read twice): against the loops a greedy policy falls into
  letter_e  letter_e_weight * (number of 'e' in the command)      the toy sanity task of the original project

The per-token KL penalty is not part of this chain: it depends on the model, and lives in the training loop.

A trainer's reward is any function `reward_fn(outcome: TurnOutcome) -> float` that it hands to the collector;
`reward_chain(config)` is the default. A TurnOutcome carries the state the command was given in, the command, the
step's result and the episode's earlier turns, so a reward that needs the episode's history (`revisit`) can
be written as a function of it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from lib.env import GameState, StepResult
from lib.prompts import Turn, clean_observation

REWARD_NAMES = ("score", "win", "lose", "living", "invalid", "revisit", "letter_e")


@dataclass
class RewardConfig:
    names: tuple[str, ...] = ("score", "win", "invalid")
    score_weight: float = 1.0
    win_bonus: float = 1.0
    lose_penalty: float = 1.0
    living_cost: float = 0.01
    invalid_penalty: float = 0.1
    letter_e_weight: float = 1.0
    revisit_penalty: float = 0.1

    def __post_init__(self):
        self.names = tuple(self.names)
        unknown = [name for name in self.names if name not in REWARD_NAMES]
        if unknown or not self.names:
            raise ValueError(
                f"unknown reward name(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                f"--reward takes a comma list of: {', '.join(REWARD_NAMES)}"
            )


def parse_reward_names(text: str) -> tuple[str, ...]:
    """'score, win,invalid' -> ('score', 'win', 'invalid'), duplicates dropped."""
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def state_unchanged(before: GameState, after: GameState) -> bool:
    return (before.observation, before.inventory, before.score) == (after.observation, after.inventory, after.score)


@dataclass
class TurnOutcome:
    """What a reward function sees of one turn."""

    before: GameState  # the state the command was given in
    command: str  # the policy's command (what it wrote or chose)
    result: StepResult  # result.state: right after the command; result.reward: the score change
    history: list[Turn] = field(default_factory=list)  # the episode's earlier turns, oldest first


RewardFn = Callable[[TurnOutcome], float]


def reward_chain(config: RewardConfig) -> RewardFn:
    """The built-in reward: the sum of the `--reward` components (compute_reward's total)."""

    def reward(outcome: TurnOutcome) -> float:
        return compute_reward(outcome.result, outcome.command, config, outcome.before, outcome.history)["total"]

    return reward


def compute_reward(
    result: StepResult, command: str, config: RewardConfig, before: GameState | None = None,
    history: list[Turn] | None = None,
) -> dict[str, float]:
    """The chosen components of one step's reward and their sum under 'total'.

    `command` is the model's command (what `letter_e` counts); `before` is the state the command was given in,
    needed to call an admissible command that changed nothing invalid; `history` the episode's earlier turns (their
    cleaned observations), with `before`'s what `revisit` compares against.
    """
    after = result.state
    components = {}
    for name in config.names:
        if name == "score":
            components[name] = config.score_weight * result.reward
        elif name == "win":
            components[name] = config.win_bonus if after.won else 0.0
        elif name == "lose":
            components[name] = -config.lose_penalty if after.lost else 0.0
        elif name == "living":
            components[name] = -config.living_cost
        elif name == "invalid":
            # A crashed game process is not the command's fault, even though its state did not change.
            wasted = not result.crashed and (result.invalid or (before is not None and state_unchanged(before, after)))
            components[name] = -config.invalid_penalty if wasted else 0.0
        elif name == "revisit":
            seen = {turn.observation for turn in history or []}
            if before is not None:
                seen.add(clean_observation(before.observation, before.objective))
            again = not result.crashed and clean_observation(after.observation, after.objective) in seen
            components[name] = -config.revisit_penalty if again else 0.0
        elif name == "letter_e":
            components[name] = config.letter_e_weight * command.count("e")
    components["total"] = float(sum(components.values()))
    return components
