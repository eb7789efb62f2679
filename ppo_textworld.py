"""PPO for causal LMs playing TextWorld games: each turn the policy chooses (default) or writes a command, the games
score it.

Launch:
    python ppo_textworld.py                                     # defaults: SmolLM2-135M, `default` games, CPU ok
    python ppo_textworld.py --action_mode generate              # write commands instead of choosing admissible ones
    python ppo_textworld.py --action_mode generate --reward letter_e  # the toy task: say many 'e'
    python ppo_textworld.py --advantage_estimator grpo --group_size 4  # no value head: episodes against their group
    python ppo_textworld.py --advantage_estimator gigpo --group_size 4  # ... plus turns against same-state turns
    python ppo_textworld.py configs/ppo_hard.yaml --seed 1      # flags from a YAML file, then overrides
    python ppo_textworld.py --resume_from_checkpoint latest     # continue outputs/ppo where it stopped
    accelerate launch --config_file accelerate_configs/zero2.yaml ppo_textworld.py --model_name_or_path ...
    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml ppo_textworld.py   # 2 CPU processes

One iteration (main(), top to bottom):
  1. rollout (lib/rollout.py): each process plays turns_per_slot turns in each of its num_envs / num_processes game
     slots (whole episodes with the critic-free estimators), caching per response token the behaviour log-prob, the
     reference log-prob and the value (values[0]: the turn's state), per turn the reward (reward_fn: the --reward
     chain by default; pass your own, see REWARD_FN below) and next_value (the value of the state the turn led to);
  2. rewards per token: -kl_coef * KL estimate (k1/k2/k3 of log pi - log ref) at every token, plus the turn's
     reward on its last token (lib.losses.penalized_rewards);
  3. advantages (ADVANTAGES below), whitened over the batch (optionally over all processes) for gae;
  4. ppo_epochs passes over the turns, each split into num_minibatches minibatches (one optimizer step each) of
     gradient_accumulation_steps micro-batches; loss = clipped policy loss + vf_coef * clipped value loss
     - ent_coef * entropy (+ kl_loss_coef * exact KL to the reference), averaged over every token of every turn of
     the micro-batch (LOSSES below);
  5. the adaptive KL controller (if on) moves kl_coef toward target_kl; metrics are logged, the rollout is saved
     as a dataset, and every eval_every / save_every iterations the policy is evaluated greedily on held-out games
     and checkpointed.

What differs between the action modes is chosen once, before the loop (`collate`, `loss_fn`, `estimate`):
  --action_mode generate: token-level PPO. The policy writes a command; each response token is an action.
    Advantages: token-level GAE inside each response (lib.losses.gae_advantages: gamma_token and lam between
    tokens, gamma_turn * next_value at the last token). Loss: lib.losses.ppo_loss on the response tokens.
  --action_mode score (the default): turn-level PPO over the admissible commands (lib/scoring.py). The policy of a
    turn is softmax(scores / temperature) over the state's candidates (a score: the sum, or with --length_normalize
    the mean, of the command's token log-probs); each turn is a one-token response. Advantages: turn-level GAE over
    each slot's turns (lib.losses.turn_gae: gamma_turn, lam). Loss: lib.losses.candidate_ppo_loss, clipping the
    ratio of the chosen command's probability, with entropy and exact KL over the candidates; every micro-batch
    rescores its turns' candidates with gradient (one packed row per state, lib.scoring.candidate_logprobs_packed).
    With --share_trunk (on), the reference reads the policy's frozen bottom layers, which run once per token in the
    rollout, and each micro-batch starts from their states, kept by the rollout, at the first trainable layer
    (lib/trunk.py).
  --advantage_estimator grpo, rloo or gigpo (either mode): no value head is built or saved. The slots play in groups
    of --group_size on the same game from the same start (lib.env.BatchEnv group_size), whole episodes per
    iteration (cut at --train_max_episode_turns, when given, for cheaper iterations on long games); an episode's
    advantage is its return (rewards, KL penalty included) against its group's, given to every token of every turn
    of the episode: grpo normalizes it within the group (lib.losses.group_relative_advantages), rloo subtracts the
    mean of the group's other returns (lib.losses.rloo_advantages);
    gigpo adds to grpo's, per turn, --gigpo_step_weight times the turn's return (discounted by --gamma_turn)
    normalized among the group's turns played from the same state (Transition.state_key; lib.losses.
    group_in_group_advantages).
  --context episode (either mode, gae or critic-free): each slot's turns in an iteration are one token stream read
    through a KV cache (lib/streams.py): the rollout encodes only each turn's new tokens, the losses
    (`stream_token_loss`, `stream_turn_loss`) read each stream in one packed row, and `ppo_update` splits whole
    streams (`stream_units`) into micro-batches.
An update that meets a NaN or inf (loss, gradient norm, rewards, values, advantages) is skipped with a warning
(lib.training.NonFiniteGuard); --max_nonfinite_updates in a row stop the run before it saves.
Log-probs, entropy and the KL terms use logits divided by the sampling temperature (top-k/top-p truncation is
ignored), so the behaviour policy is the one that sampled.

Outputs (output_dir): the final policy (save_pretrained) + value_head.safetensors (gae) + tokenizer + README.md +
training_args.json, ready for `play.py --agent model --model_name_or_path outputs/ppo` (which plays it with these
prompt settings) or for more PPO (`--model_name_or_path outputs/ppo` continues with its value head);
checkpoints/checkpoint-N after iteration N (the same, plus training_state/ for resuming, trainer_state.json, and
process_state-P.json: where each game slot of process P stands, so that a resumed run continues its episodes and
ends as the uninterrupted run would); rollouts/iteration-NNNNN datasets (lib.rollout.load_rollouts); runs/ logs.
"""

import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object

from lib.agents import EpisodeModelAgent, EpisodeScoringAgent, ModelAgent, ScoringAgent
from lib.arguments import (
    RolloutArguments,
    generation_config,
    prompt_config,
    reward_config,
    scoring_config,
)
from lib.env import BatchEnv
from lib.curriculum import Curriculum
from lib.losses import (
    KL_DIRECTIONS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    candidate_ppo_loss,
    explained_variance,
    gae_advantages,
    group_in_group_advantages,
    group_relative_advantages,
    kl_estimate,
    masked_mean,
    masked_moments,
    masked_whiten,
    mean_var_from_moments,
    penalized_rewards,
    ppo_loss,
    rloo_advantages,
    turn_gae,
    whiten_with_stats,
)
from lib.models import resolve_model
from lib.rewards import reward_chain
from lib.rollout import RolloutCollector, ScoringRolloutCollector, Transition, load_rollouts, rollout_rows, save_rollouts
from lib.scoring import pad_rows, policy_logprobs, score_candidates
from lib.sequences import model_inputs, pack_sequences, response_logits
from lib.streams import candidate_scores, pack_stream_segments, per_turn, stream_outputs
from lib.training import (
    RunArguments,
    RunningMeans,
    TrainingRun,
    backward_and_step,
    build_optimizer,
    load_models_or_exit,
    main_or_exit,
    model_card,
    parse_or_exit,
)
from lib.trunk import share_trunk
from lib.value_head import VALUE_HEAD_FILE, VALUE_HEAD_TYPES, PolicyWithValue, ValueHead, load_value_head

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "gigpo")
CRITIC_FREE_ESTIMATORS = ADVANTAGE_ESTIMATORS[1:]  # groups of whole episodes, no value head


@dataclass
class PPORunArguments(RunArguments):
    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the final model, checkpoints, rollouts and logs go."})
    num_iterations: int = field(default=6, metadata={"help": "PPO iterations (rollout + update)."})
    turns_per_slot: int = field(default=8, metadata={"help": "Turns each slot plays per iteration (gae); the batch is num_envs * turns_per_slot turns. The critic-free estimators play whole episodes."})
    eval_every: int = field(default=2, metadata={"help": "Evaluate every N iterations (0: only before and after training)."})
    save_every: int = field(default=2, metadata={"help": "Checkpoint every N iterations (0: only at the end); a stopped run resumes from the newest."})
    curriculum_threshold: float = field(default=0.8, metadata={"help": "Curriculum (--train_games 'A > B > ...'): move to the next stage when the win rate of the stage's last curriculum_window training episodes reaches this."})
    curriculum_window: int = field(default=32, metadata={"help": "Training episodes of a stage whose win rate decides the move (the window must be full)."})


@dataclass
class PPOArguments:
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (5e-5 moves the last third of SmolLM2-135M within a few iterations)."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout batch."})
    num_minibatches: int = field(default=2, metadata={"help": "Optimizer steps per epoch; each process's turns split into this many minibatches."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per minibatch (gradients summed before the optimizer step)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (DeepSpeed: its gradient_clipping)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    clip_range_value: float | None = field(default=0.2, metadata={"help": "Value clip range around the rollout values (none: no value clipping)."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    advantage_estimator: str = field(default="gae", metadata={"help": f"{', '.join(ADVANTAGE_ESTIMATORS)}: GAE with a value head; or, without one, each episode against its group: normalized (grpo), against the others' mean (rloo), plus each turn against the group's turns from the same state (gigpo)."})
    group_size: int = field(default=1, metadata={"help": f"Slots per group playing the same game from the same start ({'/'.join(CRITIC_FREE_ESTIMATORS)}: at least 2)."})
    gigpo_step_weight: float = field(default=1.0, metadata={"help": "gigpo: weight (omega) of the step-level advantage added to the episode-level one."})
    gamma_token: float = field(default=1.0, metadata={"help": "Discount between tokens of one response (generate mode)."})
    gamma_turn: float = field(default=0.95, metadata={"help": "Discount between turns (gae: applied to next_value; gigpo: in the turns' returns of the step level)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the per-token reward (initial value when adaptive)."})
    kl_estimator: str = field(default="k3", metadata={"help": f"Per-token KL estimator in the reward: {', '.join(KL_ESTIMATORS)}."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef toward target_kl (Ziegler et al. 2019)."})
    target_kl: float = field(default=0.1, metadata={"help": "Target KL per turn (summed over its tokens) for the adaptive controller."})
    kl_horizon: float = field(default=10000.0, metadata={"help": "Horizon (turns) of the adaptive KL controller."})
    kl_loss_coef: float = field(default=0.0, metadata={"help": "Weight of an exact-gradient KL loss to the reference (0: off)."})
    kl_direction: str = field(default="reverse", metadata={"help": f"Direction of the exact KL loss: {', '.join(KL_DIRECTIONS)}."})
    share_trunk: bool = field(default=True, metadata={"help": "The reference uses the policy's frozen bottom layers (one copy in memory); in score mode they run once per token for both, and the update starts from their states kept by the rollout (lib/trunk.py). false: two whole models, as before."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten gae advantages over the batch."})
    whiten_across_processes: bool = field(default=False, metadata={"help": "Whiten with statistics of all processes' batches."})


@dataclass
class ValueHeadArguments:
    value_head_type: str = field(default="linear", metadata={"help": f"Value head: {', '.join(VALUE_HEAD_TYPES)} (mlp: 2 layers)."})
    value_head_hidden_size: int = field(default=0, metadata={"help": "Hidden width of the mlp value head (0: the LM's hidden size)."})
    detach_value_head: bool = field(default=False, metadata={"help": "Detach the value head's input: the value loss does not move the LM."})
    value_learning_rate: float | None = field(default=None, metadata={"help": "The value head's own learning rate (none: --learning_rate)."})
    value_warmup_iterations: int = field(default=0, metadata={"help": "First iterations that train the value head alone: the loss is vf_coef * value loss and the policy's learning rate is 0."})


ALL_ARGUMENTS = (PPORunArguments, PPOArguments, ValueHeadArguments, RolloutArguments)

# A turn's reward: lib.rewards.reward_chain of the --reward flags by default. Replace it with any function of a
# lib.rewards.TurnOutcome (the state before, the command, the step's result, the episode's earlier turns), e.g.
#   def REWARD_FN(outcome):  # the game's score change, minus 0.05 for a command already given in this episode
#       repeated = any(turn.command == outcome.command for turn in outcome.history)
#       return outcome.result.reward - 0.05 * repeated
REWARD_FN = None


def check_arguments(run: PPORunArguments, ppo: PPOArguments, value_head: ValueHeadArguments, rollout: RolloutArguments,
                    world_size: int) -> None:
    """Raise ValueError naming the flag for every bad value or combination of PPO's own flags (parse_or_exit checks
    the shared ones first); builds nothing heavy."""
    positive = {
        "num_iterations": run.num_iterations, "turns_per_slot": run.turns_per_slot, "ppo_epochs": ppo.ppo_epochs,
        "num_minibatches": ppo.num_minibatches, "gradient_accumulation_steps": ppo.gradient_accumulation_steps,
        "learning_rate": ppo.learning_rate, "clip_range": ppo.clip_range, "max_grad_norm": ppo.max_grad_norm,
        "kl_horizon": ppo.kl_horizon, "group_size": ppo.group_size, "curriculum_window": run.curriculum_window,
    }
    if ppo.clip_range_value is not None:
        positive["clip_range_value"] = ppo.clip_range_value
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    for name in ("eval_every", "save_every"):
        if getattr(run, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(run, name)}")
    if not 0 <= run.curriculum_threshold <= 1:
        raise ValueError(f"--curriculum_threshold is a win rate in [0, 1], got {run.curriculum_threshold}")
    for name in ("vf_coef", "ent_coef", "kl_coef", "kl_loss_coef", "gigpo_step_weight"):
        if getattr(ppo, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(ppo, name)}")
    for name in ("gamma_token", "gamma_turn", "lam"):
        if not 0 <= getattr(ppo, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(ppo, name)}")
    if ppo.adaptive_kl and not ppo.target_kl > 0:
        raise ValueError(f"--target_kl must be positive with --adaptive_kl, got {ppo.target_kl}")
    if ppo.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"--kl_estimator {ppo.kl_estimator!r} is unknown; choose one of {', '.join(KL_ESTIMATORS)}")
    if ppo.kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"--kl_direction {ppo.kl_direction!r} is unknown; choose one of {', '.join(KL_DIRECTIONS)}")
    if ppo.advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"--advantage_estimator {ppo.advantage_estimator!r} is unknown; choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    if value_head.value_head_type not in VALUE_HEAD_TYPES:
        raise ValueError(f"--value_head_type {value_head.value_head_type!r} is unknown; choose one of {', '.join(VALUE_HEAD_TYPES)}")
    if value_head.value_head_hidden_size < 0:
        raise ValueError(f"--value_head_hidden_size must be >= 0, got {value_head.value_head_hidden_size}")
    if value_head.value_learning_rate is not None and not value_head.value_learning_rate > 0:
        raise ValueError(f"--value_learning_rate must be positive, got {value_head.value_learning_rate}")
    if value_head.value_warmup_iterations < 0:
        raise ValueError(f"--value_warmup_iterations must be >= 0, got {value_head.value_warmup_iterations}")
    if ppo.advantage_estimator != "gae":
        for name, unset in (("value_learning_rate", None), ("value_warmup_iterations", 0)):
            if getattr(value_head, name) != unset:
                raise ValueError(f"--{name} trains the value head, which --advantage_estimator "
                                 f"{ppo.advantage_estimator} has none of: drop it, or use gae")
    if run.num_envs % world_size:
        raise ValueError(f"--num_envs {run.num_envs} must be divisible by the number of processes ({world_size})")
    slots = run.num_envs // world_size
    if slots % ppo.group_size:
        raise ValueError(f"each process's {slots} slots (num_envs / processes) must be divisible by --group_size {ppo.group_size}")
    micro_batches = ppo.num_minibatches * ppo.gradient_accumulation_steps
    if ppo.advantage_estimator == "gae" and ppo.group_size != 1:
        raise ValueError(f"--group_size {ppo.group_size} groups slots for --advantage_estimator "
                         f"{'/'.join(CRITIC_FREE_ESTIMATORS)}; gae plays every slot alone (1)")
    critic_free = ppo.advantage_estimator in CRITIC_FREE_ESTIMATORS
    if critic_free and ppo.group_size < 2:
        raise ValueError(f"--advantage_estimator {ppo.advantage_estimator} compares the episodes of a group: "
                         f"--group_size must be at least 2, got {ppo.group_size}")
    if critic_free or rollout.context == "episode":
        if slots < micro_batches:  # every slot plays at least one turn (one stream): every micro-batch then gets one
            why = (f"{ppo.advantage_estimator}, whose batches vary with the episodes' lengths" if critic_free else
                   "--context episode, whose micro-batches hold whole streams")
            raise ValueError(
                f"each process's {slots} slots must be at least --num_minibatches * --gradient_accumulation_steps "
                f"({micro_batches}) with {why}"
            )
    else:
        per_process = slots * run.turns_per_slot
        if per_process % ppo.num_minibatches:
            raise ValueError(
                f"each process's batch (num_envs / processes * turns_per_slot = {per_process} turns) must be divisible by "
                f"--num_minibatches {ppo.num_minibatches}"
            )
        if per_process // ppo.num_minibatches % ppo.gradient_accumulation_steps:
            raise ValueError(
                f"each minibatch ({per_process // ppo.num_minibatches} turns) must be divisible by "
                f"--gradient_accumulation_steps {ppo.gradient_accumulation_steps}"
            )


# ---- BATCHES: the rollout's turns as tensors. Both modes give mask, logprobs, ref_logprobs, values (N, T) (values
# None without a value head), and rewards, dones, truncateds, next_values (N,); score mode's T is 1 (a turn is one
# decision) and it adds chosen_index (N,).

def collate_responses(turns: list[Transition], pad_id: int) -> dict:
    """--action_mode generate: per response token, right-padded to the longest response T."""
    width = max(len(t.response_ids) for t in turns)

    def pad(rows, value=0.0, dtype=torch.float32):
        return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=dtype)

    return {
        "response_ids": pad([t.response_ids for t in turns], pad_id, torch.long),
        "mask": pad([[True] * len(t.response_ids) for t in turns], False, torch.bool),
        "logprobs": pad([t.logprobs.tolist() for t in turns]),
        "ref_logprobs": pad([t.ref_logprobs.tolist() for t in turns]),
        "values": None if turns[0].values is None else pad([t.values.tolist() for t in turns]),
        **_turn_fields(turns),
    }


def collate_decisions(turns: list[Transition]) -> dict:
    """--action_mode score: one decision per turn, the chosen command's log-probs and the state's value, (N, 1)."""
    return {
        "mask": torch.ones(len(turns), 1, dtype=torch.bool),
        "logprobs": torch.stack([t.logprobs for t in turns]).float(),
        "ref_logprobs": torch.stack([t.ref_logprobs for t in turns]).float(),
        "values": None if turns[0].values is None else torch.stack([t.values for t in turns]).float(),
        "chosen_index": torch.tensor([t.chosen_index for t in turns]),
        **_turn_fields(turns),
    }


def _turn_fields(turns: list[Transition]) -> dict:
    return {
        "rewards": torch.tensor([t.reward for t in turns], dtype=torch.float32),
        "dones": torch.tensor([t.done for t in turns], dtype=torch.float32),
        "truncateds": torch.tensor([t.truncated for t in turns], dtype=torch.float32),
        "next_values": torch.tensor([t.next_value for t in turns], dtype=torch.float32),
    }


# ---- ADVANTAGES: (turns, batch, per-token rewards (N, T), KL penalty included) -> (advantages, returns) (N, T).

def token_level_gae(turns: list[Transition], batch: dict, rewards: torch.Tensor, ppo: PPOArguments):
    """GAE inside each response; the next turn enters through next_value at the last token."""
    return gae_advantages(
        rewards, batch["values"], batch["mask"], batch["next_values"], batch["dones"],
        gamma_token=ppo.gamma_token, gamma_turn=ppo.gamma_turn, lam=ppo.lam,
    )


def turn_level_gae(turns: list[Transition], batch: dict, rewards: torch.Tensor, ppo: PPOArguments):
    """GAE over each slot's turns in time order (the rollout lists them turn by turn, slots interleaved); a truncation
    stops the recursion (the next turn is another episode's) after bootstrapping from next_value."""
    rows, mask = slot_rows(turns)
    take = rows.clamp(min=0)
    advantages, returns = turn_gae(
        rewards[:, 0][take], batch["values"][:, 0][take], mask, batch["next_values"][take], batch["dones"][take],
        batch["truncateds"][take], gamma=ppo.gamma_turn, lam=ppo.lam,
    )
    return _from_slot_rows(advantages, rows, len(turns)), _from_slot_rows(returns, rows, len(turns))


def group_advantages(turns: list[Transition], batch: dict, rewards: torch.Tensor, ppo: PPOArguments):
    """grpo and rloo: an episode's return (its turns' rewards summed) against the other episodes of its group
    (lib.losses.group_relative_advantages, rloo_advantages), on every token of every turn of the episode; returns:
    the episode's return."""
    episode_of, group_of = _episodes_and_groups(turns)
    episode_returns = torch.zeros(int(episode_of.max()) + 1).index_add_(0, episode_of, rewards.sum(dim=1))
    group_ids = torch.zeros(len(episode_returns), dtype=torch.long).scatter_(0, episode_of, group_of)
    against_group = rloo_advantages if ppo.advantage_estimator == "rloo" else group_relative_advantages
    advantages = against_group(episode_returns, group_ids)
    mask = batch["mask"].float()
    return advantages[episode_of, None] * mask, episode_returns[episode_of, None] * mask


def gigpo_advantages(turns: list[Transition], batch: dict, rewards: torch.Tensor, ppo: PPOArguments):
    """gigpo: grpo's episode-level advantage plus --gigpo_step_weight times a step-level one, each turn's return
    (discounted by --gamma_turn) against those of the group's turns played from the same state (Transition.state_key)
    (lib.losses.group_in_group_advantages), on every token of the turn; returns: the episode's return."""
    episode_of, group_of = _episodes_and_groups(turns)
    states: dict[str, int] = {}
    state_ids = torch.tensor([states.setdefault(t.state_key, len(states)) for t in turns])
    turn_rewards = rewards.sum(dim=1)
    advantages = group_in_group_advantages(turn_rewards, episode_of, group_of, state_ids, gamma=ppo.gamma_turn,
                                           step_weight=ppo.gigpo_step_weight)
    episode_returns = torch.zeros(int(episode_of.max()) + 1).index_add_(0, episode_of, turn_rewards)
    mask = batch["mask"].float()
    return advantages[:, None] * mask, episode_returns[episode_of, None] * mask


def _episodes_and_groups(turns: list[Transition]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per turn, the index of its episode among the batch's (slot, episode) pairs and its group: group members share
    their episode number (lib.env.BatchEnv group_size)."""
    episodes: dict[tuple[int, int], int] = {}
    episode_of = torch.tensor([episodes.setdefault((t.slot, t.episode), len(episodes)) for t in turns])
    return episode_of, torch.tensor([t.episode for t in turns])


# The critic-free estimators' ADVANTAGES (gae's depends on the action mode: token_level_gae, turn_level_gae).
CRITIC_FREE_ADVANTAGES = {"grpo": group_advantages, "rloo": group_advantages, "gigpo": gigpo_advantages}


def slot_rows(turns: list[Transition]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's turns in time order as rows: (S, L) indices into `turns` (-1 after a slot's last turn) and mask."""
    by_slot: dict[int, list[int]] = {}
    for index, turn in enumerate(turns):
        by_slot.setdefault(turn.slot, []).append(index)
    width = max(map(len, by_slot.values()))
    rows = torch.tensor([indices + [-1] * (width - len(indices)) for _, indices in sorted(by_slot.items())])
    return rows, rows >= 0


def _from_slot_rows(values: torch.Tensor, rows: torch.Tensor, num_turns: int) -> torch.Tensor:
    flat = torch.zeros(num_turns, dtype=values.dtype)
    flat[rows[rows >= 0]] = values[rows >= 0]
    return flat[:, None]


def advantages_and_returns(turns: list[Transition], batch: dict, estimate, kl_coef: float, ppo: PPOArguments,
                           reduce_sum=None):
    """Per-token KL estimates, advantages (whitened for gae when --whiten_advantages; over all processes with
    `reduce_sum`, an all-reduce of a tensor), the advantages before whitening, and the returns; all (N, T)."""
    mask = batch["mask"]
    kl = kl_estimate(batch["logprobs"], batch["ref_logprobs"], estimator=ppo.kl_estimator) * mask
    rewards = penalized_rewards(kl, batch["rewards"], mask, kl_coef=kl_coef)
    raw_advantages, returns = estimate(turns, batch, rewards, ppo)
    advantages = raw_advantages
    if ppo.advantage_estimator == "gae" and ppo.whiten_advantages:
        if reduce_sum is not None:
            mean, var = mean_var_from_moments(*reduce_sum(torch.stack(masked_moments(advantages.double(), mask))))
            advantages = whiten_with_stats(advantages, mean.float(), var.float(), mask=mask)
        elif mask.sum() > 1:  # a variance needs two tokens (num_envs = turns_per_slot = 1)
            advantages = masked_whiten(advantages, mask)
    return kl, advantages, raw_advantages, returns


# ---- LOSSES: one micro-batch of turns (`index` into the batch) -> (loss, stats, tokens encoded).

def response_token_loss(logits, values, ref_logits, batch, index, advantages, returns, *, ppo: PPOArguments,
                        temperature: float, device, value_only: bool):
    """lib.losses.ppo_loss of the micro-batch `index` from the policy's logits (N, T, V) and values (N, T) at its
    response tokens (and the reference's logits when --kl_loss_coef, already divided by the temperature)."""
    old_values = None if values is None else batch["values"][index].to(device)
    return ppo_loss(
        logits.float() / temperature, None if values is None else values.float(), batch["response_ids"][index].to(device),
        batch["mask"][index].to(device), batch["logprobs"][index].to(device), old_values, advantages[index].to(device),
        returns[index].to(device), ref_logits, clip_range=ppo.clip_range, clip_range_value=ppo.clip_range_value,
        vf_coef=ppo.vf_coef, ent_coef=ppo.ent_coef, kl_loss_coef=ppo.kl_loss_coef, kl_direction=ppo.kl_direction,
        value_only=value_only,
    )


def token_level_loss(model, ref_model, turns, batch, index, advantages, returns, *, ppo: PPOArguments,
                     temperature: float, pad_id: int, device, value_only: bool = False):
    """lib.losses.ppo_loss over the response tokens; one forward of prompt + response per turn."""
    width = batch["mask"].shape[1]
    packed = pack_sequences([turns[i].prompt_ids for i in index], [turns[i].response_ids for i in index], pad_id, width)
    inputs = model_inputs(packed, device)
    logits, values = model(*inputs, packed["start"], packed["end"])
    ref_logits = None
    if ppo.kl_loss_coef > 0:
        with torch.no_grad():
            ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float() / temperature
    loss, stats = response_token_loss(logits, values, ref_logits, batch, index, advantages, returns, ppo=ppo,
                                      temperature=temperature, device=device, value_only=value_only)
    return loss, stats, int(packed["attention_mask"].sum())


def turn_level_loss(model, ref_model, turns, batch, index, advantages, returns, *, ppo: PPOArguments,
                    temperature: float, pad_id: int, device, length_normalize: bool, trunk_layers: int = 0,
                    value_only: bool = False):
    """lib.losses.candidate_ppo_loss over the turns' candidates, rescored with gradient; the value comes from the
    same prompt forward. Turns that kept their trunk states (lib/trunk.py) are rescored from them."""
    prompt_ids, candidate_ids = [turns[i].prompt_ids for i in index], [turns[i].candidate_ids for i in index]
    trunks = [turns[i].trunk for i in index]
    kept = {"trunk_layers": trunk_layers, "trunks": trunks} if all(t is not None for t in trunks) else {}
    scored = score_candidates(model, ref_model if ppo.kl_loss_coef > 0 else None, prompt_ids, candidate_ids, pad_id,
                              length_normalize, temperature, **kept)
    old_values = None if scored["values"] is None else batch["values"][index, 0].to(device)
    loss, stats = candidate_ppo_loss(
        scored["logprobs"], scored["mask"], batch["chosen_index"][index].to(device), batch["logprobs"][index, 0].to(device),
        scored["values"], old_values, advantages[index, 0].to(device), returns[index, 0].to(device),
        scored["ref_logprobs"], clip_range=ppo.clip_range, clip_range_value=ppo.clip_range_value, vf_coef=ppo.vf_coef,
        ent_coef=ppo.ent_coef, kl_loss_coef=ppo.kl_loss_coef, kl_direction=ppo.kl_direction, value_only=value_only,
    )
    tokens = sum(len(ids) + sum(map(len, rows)) for ids, rows in zip(prompt_ids, candidate_ids))
    return loss, stats, tokens


def stream_segments(turns: list[Transition], index: torch.Tensor) -> list[dict]:
    """--context episode: the micro-batch's turns (`index`: whole streams, each in time order) as the segments
    lib.streams.pack_stream_segments lays out, in the order of `index`."""
    segments: dict[int, dict] = {}
    for i in index.tolist():
        turn = turns[i]
        segment = segments.setdefault(turn.stream, {"turns": []})
        segment["turns"].append({"prompt_ids": turn.prompt_ids, "response_ids": turn.response_ids,
                                 "candidate_ids": turn.candidate_ids, "trunk": turn.trunk,
                                 "chosen_index": turn.chosen_index})
    return list(segments.values())


def stream_token_loss(model, ref_model, turns, batch, index, advantages, returns, *, ppo: PPOArguments,
                      temperature: float, pad_id: int, device, value_only: bool = False):
    """token_level_loss on streams: one forward per stream (its turns' prompt and response tokens), the loss on the
    response tokens only."""
    packed = pack_stream_segments(stream_segments(turns, index), pad_id)
    width = batch["mask"].shape[1]
    logits, values = model(stream=packed, values_at="logits_at")
    logits = per_turn(logits, packed["lengths"], width)
    values = None if values is None else per_turn(values, packed["lengths"], width)
    ref_logits = None
    if ppo.kl_loss_coef > 0:
        with torch.no_grad():
            ref_logits = per_turn(stream_outputs(ref_model, packed)[0], packed["lengths"], width).float() / temperature
    loss, stats = response_token_loss(logits, values, ref_logits, batch, index, advantages, returns, ppo=ppo,
                                      temperature=temperature, device=device, value_only=value_only)
    return loss, stats, packed["tokens"]


def stream_turn_loss(model, ref_model, turns, batch, index, advantages, returns, *, ppo: PPOArguments,
                     temperature: float, pad_id: int, device, length_normalize: bool, trunk_layers: int = 0,
                     value_only: bool = False):
    """turn_level_loss on streams: each turn's candidates rescored with gradient in one forward per stream
    (candidate blocks beside the stream), the value at each turn's last prompt token; from the streams' kept trunk
    states when they have them (lib/trunk.py)."""
    packed = pack_stream_segments(stream_segments(turns, index), pad_id)
    trunk_layers = trunk_layers if packed["trunks"] is not None else 0
    logits, values = model(stream=packed, trunk_layers=trunk_layers)

    def policy(scores):
        return pad_rows([policy_logprobs(s, temperature) for s in scores])

    logprobs = policy(candidate_scores(logits, packed, length_normalize))
    ref_logprobs = None
    if ppo.kl_loss_coef > 0:
        with torch.no_grad():
            ref_logits = stream_outputs(ref_model, packed, trunk_layers=trunk_layers)[0]
            ref_logprobs = policy(candidate_scores(ref_logits, packed, length_normalize))
    mask = pad_rows([torch.ones(count, dtype=torch.bool, device=logprobs.device) for count in packed["counts"]])
    old_values = None if values is None else batch["values"][index, 0].to(device)
    loss, stats = candidate_ppo_loss(
        logprobs, mask, batch["chosen_index"][index].to(device), batch["logprobs"][index, 0].to(device),
        None if values is None else values.float(), old_values, advantages[index, 0].to(device),
        returns[index, 0].to(device), ref_logprobs, clip_range=ppo.clip_range, clip_range_value=ppo.clip_range_value,
        vf_coef=ppo.vf_coef, ent_coef=ppo.ent_coef, kl_loss_coef=ppo.kl_loss_coef, kl_direction=ppo.kl_direction,
        value_only=value_only,
    )
    return loss, stats, packed["tokens"]


def stream_units(turns: list[Transition]) -> list[list[int]]:
    """--context episode: the turns of each stream in time order (the rollout lists them turn by turn)."""
    units: dict[int, list[int]] = {}
    for index, turn in enumerate(turns):
        units.setdefault(turn.stream, []).append(index)
    return list(units.values())


def ppo_update(accelerator, model, optimizer, guard, loss_fn, turns, batch, advantages, returns, *, ppo: PPOArguments,
               parameters: list, where: str, units: list[list[int]] | None = None,
               value_only: bool = False) -> tuple[RunningMeans, int]:
    """ppo_epochs passes over the turns in a new random order each; each pass is num_minibatches minibatches of
    gradient_accumulation_steps micro-batches (consecutive slices of the order); accelerate steps the optimizer after
    a minibatch's last micro-batch. `units` (episode context: whole streams) are shuffled and split instead of
    single turns; value_only: a value warm-up, the loss is the value term alone. Returns the loss figures' running
    means and the tokens encoded."""
    figures, tokens = RunningMeans(), 0
    units = units or [[i] for i in range(len(turns))]
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(len(units))
        for part in torch.tensor_split(order, ppo.num_minibatches * ppo.gradient_accumulation_steps):
            index = torch.tensor([i for unit in part.tolist() for i in units[unit]], dtype=torch.long)
            with accelerator.accumulate(model):
                loss, stats, encoded = loss_fn(model, turns=turns, batch=batch, index=index, advantages=advantages,
                                               returns=returns, value_only=value_only)
                finite, stepped, grad_norm = backward_and_step(accelerator, guard, loss, optimizer, parameters,
                                                               ppo.max_grad_norm, where)
            tokens += encoded
            if finite:
                figures.add(stats)
            if stepped:
                figures.add({"grad_norm": grad_norm or 0.0})
    return figures, tokens


def parameter_groups(model: PolicyWithValue, learning_rate: float, args: ValueHeadArguments) -> list[dict]:
    """The optimizer's parameter groups: one at --learning_rate, or, with --value_learning_rate or a value warm-up,
    the policy's trainable parameters (POLICY_GROUP: the warm-up sets its rate to 0) and then the value head's at
    --value_learning_rate (else --learning_rate). One group by default, as before these flags existed, so that
    earlier checkpoints' optimizer states still load (the flags must match on resume: RESUME_MUST_MATCH)."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    value = [p for name, p in trainable if name.startswith("value_head.")]
    if not value or (args.value_learning_rate is None and not args.value_warmup_iterations):
        return [{"params": [p for _, p in trainable], "lr": learning_rate}]
    value_learning_rate = learning_rate if args.value_learning_rate is None else args.value_learning_rate
    return [{"params": [p for name, p in trainable if not name.startswith("value_head.")], "lr": learning_rate},
            {"params": value, "lr": value_learning_rate}]


POLICY_GROUP = 0  # the index of the policy's parameters among parameter_groups


def warm_up_value_head(optimizer, iteration: int, learning_rate: float, warmup_iterations: int) -> bool:
    """Whether `iteration` trains the value head alone (the first --value_warmup_iterations); sets the policy's
    learning rate to 0 then, to --learning_rate after. The value-only loss leaves the policy's terms out; the rate of 0
    keeps the LM where it is although the value loss's gradient reaches it (unless --detach_value_head), and keeps
    AdamW's weight decay from moving it."""
    warming_up = iteration <= warmup_iterations
    optimizer.param_groups[POLICY_GROUP]["lr"] = 0.0 if warming_up else learning_rate
    return warming_up


def build_value_head(policy, model_name_or_path: str, args: ValueHeadArguments) -> ValueHead:
    """The value head of a PPO output given as --model_name_or_path (training goes on with it), else a new one."""
    folder, _ = resolve_model(model_name_or_path)
    saved = Path(folder) / VALUE_HEAD_FILE
    if not saved.is_file():
        return ValueHead(policy.config.hidden_size, args.value_head_type, args.value_head_hidden_size, args.detach_value_head)
    head = load_value_head(folder)
    wanted = {"head_type": args.value_head_type}
    if args.value_head_type == "mlp" and args.value_head_hidden_size:
        wanted["mlp_hidden_size"] = args.value_head_hidden_size
    if any(head.config()[key] != value for key, value in wanted.items()):
        sys.exit(f"error: {saved} is a {head.config()['head_type']} value head (hidden {head.config()['mlp_hidden_size']}); "
                 "pass its --value_head_type / --value_head_hidden_size to continue with it")
    head.detach_input = args.detach_value_head
    if os.environ.get("RANK", "0") == "0":  # launchers start one process per device; say it once
        print(f"continuing with the value head of {saved}", file=sys.stderr)
    return head


def main(argv: list[str]) -> None:
    (run, ppo, value_head_args, rollout_args), arguments, resume_folder = parse_or_exit(
        ALL_ARGUMENTS, argv, check_arguments, "iteration", "num_iterations"
    )
    started = time.time()
    # Models: policy + value head as one module (no value head without gae); the reference is a frozen copy of the
    # starting policy.
    tokenizer, policy, ref_model = load_models_or_exit(run, prompt_config(rollout_args), with_reference=True)
    with_critic = ppo.advantage_estimator == "gae"
    value_head = build_value_head(policy, run.model_name_or_path, value_head_args) if with_critic else None
    model = PolicyWithValue(policy, None if value_head is None else value_head.to(policy.dtype))

    training = TrainingRun(run, arguments, resume_folder, "iteration", ppo.gradient_accumulation_steps, started)
    accelerator, device, pad_id = training.accelerator, training.accelerator.device, tokenizer.pad_token_id
    if training.zero3 and not with_critic:
        sys.exit(f"error: --advantage_estimator {ppo.advantage_estimator} plays whole episodes, a different number of turns on each process, "
                 "which ZeRO-3's gathered forwards cannot pair up: use a ZeRO-2 or plain launch config")
    episode_context = rollout_args.context == "episode"
    if training.zero3 and episode_context:
        sys.exit("error: --context episode runs the decoder of each slot's stream directly, which ZeRO-3's sharded "
                 "weights do not allow: use a ZeRO-2 or plain launch config, or --context window")
    slots = run.num_envs // training.num_processes
    micro_batches = ppo.num_minibatches * ppo.gradient_accumulation_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(accelerator, parameter_groups(model, ppo.learning_rate, value_head_args),
                                ppo.learning_rate, max(1, slots * run.turns_per_slot // micro_batches),
                                ppo.gradient_accumulation_steps, ppo.max_grad_norm)
    model, optimizer, ref_model = training.prepare(model, optimizer, ref_model)
    # The reference reads the policy's frozen bottom layers instead of its own copy, once per token (lib/trunk.py).
    trunk_layers = share_trunk(accelerator.unwrap_model(model).policy, ref_model) if ppo.share_trunk else 0
    generate_kwargs = {"synced_gpus": True} if training.zero3 else {}
    kl_controller = (
        AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
    )
    start_iteration = training.resume(optimizer)
    if "kl_controller" in training.state:  # in the trainer state (JSON): accelerate would pickle a registered object
        kl_controller.load_state_dict(training.state["kl_controller"])

    # ---- the variant of the algorithm, chosen once: how turns are played, batched, scored and learned from
    unwrapped = accelerator.unwrap_model(model)
    prompts, temperature = prompt_config(rollout_args), rollout_args.temperature
    reward_fn = REWARD_FN or reward_chain(reward_config(rollout_args))
    loss_options = {"ppo": ppo, "temperature": temperature, "pad_id": pad_id, "device": device}
    # A curriculum (--train_games 'A > B > ...') plays its stages in turn; a run without one has one stage.
    curriculum = Curriculum(len(training.train_stages), run.curriculum_threshold, run.curriculum_window,
                            training.state.get("curriculum"))

    def stage_env() -> BatchEnv:
        return BatchEnv(training.train_stages[curriculum.stage], slots, run.training_episode_turns(), shuffle=True,
                        seed=run.seed + curriculum.stage, rank=training.process_index,
                        world_size=training.num_processes, group_size=ppo.group_size)

    env = stage_env()
    max_context_tokens = rollout_args.max_context_tokens if episode_context else None
    if rollout_args.action_mode == "score":
        greedy = scoring_config(rollout_args, greedy=True)
        greedy_agent = (EpisodeScoringAgent(unwrapped.policy, tokenizer, prompts, greedy, rollout_args.max_context_tokens)
                        if episode_context else ScoringAgent(unwrapped.policy, tokenizer, prompts, greedy))
        collector = ScoringRolloutCollector(env, tokenizer, prompts, scoring_config(rollout_args), reward_fn,
                                            accelerator.autocast, max_context_tokens)
        collate = collate_decisions
        loss_fn = partial(stream_turn_loss if episode_context else turn_level_loss, ref_model=ref_model,
                          length_normalize=rollout_args.length_normalize, trunk_layers=trunk_layers, **loss_options)
        estimate = turn_level_gae
    else:
        greedy = generation_config(rollout_args, greedy=True)
        greedy_agent = (EpisodeModelAgent(unwrapped.policy, tokenizer, prompts, greedy, rollout_args.max_context_tokens)
                        if episode_context else ModelAgent(unwrapped.policy, tokenizer, greedy))
        collector = RolloutCollector(env, tokenizer, prompts, generation_config(rollout_args), reward_fn,
                                     generate_kwargs, accelerator.autocast, max_context_tokens)
        collate = partial(collate_responses, pad_id=pad_id)
        loss_fn = partial(stream_token_loss if episode_context else token_level_loss, ref_model=ref_model,
                          **loss_options)
        estimate = token_level_gae
    if not with_critic:
        estimate = CRITIC_FREE_ADVANTAGES[ppo.advantage_estimator]
    turns_per_slot = run.turns_per_slot if with_critic else None  # None: whole episodes
    if resume_folder is not None:  # the games continue where the checkpoint left them
        collector.load_state_dict(training.load_process_state()["rollout"])

    training.evaluate_baselines(greedy_agent, model, prompts, tokenizer)  # random-admissible and before training

    def card(iteration: int) -> str:
        head = " A value head to continue PPO training from this folder is in `value_head.safetensors`."
        return model_card(
            run, title=f"PPO on TextWorld ({iteration} iterations)", tags=["ppo", "reinforcement-learning"],
            description=f"Fine-tuned from `{run.model_name_or_path}` with `ppo_textworld.py` "
                        f"(--action_mode {rollout_args.action_mode}, --advantage_estimator {ppo.advantage_estimator}) "
                        f"on games `{run.train_games}`." + (head if with_critic else ""),
            evals=training.evals, action_mode=rollout_args.action_mode, held_out=training.held_out,
        )

    bar = training.progress_bar(start_iteration, run.num_iterations, "ppo")
    for iteration in bar:
        # ---- 1. rollout
        started = time.time()
        rollout = collector.collect(unwrapped, ref_model, turns_per_slot)
        rollout_time = time.time() - started
        turns = rollout.transitions
        batch = collate(turns)
        mask = batch["mask"]

        # ---- 2-3. per-token rewards, advantages
        reduce_sum = (lambda x: accelerator.reduce(x.to(device), "sum").cpu()) if ppo.whiten_across_processes else None
        kl, advantages, raw_advantages, returns = advantages_and_returns(
            turns, batch, estimate, kl_controller.value, ppo, reduce_sum
        )

        # ---- 4. PPO epochs over minibatches of micro-batches
        started = time.time()
        where = f"iteration {iteration}"
        checked = [batch["rewards"], batch["logprobs"], advantages, returns] + ([batch["values"]] if with_critic else [])
        figures, update_tokens = RunningMeans(), 0
        value_only = warm_up_value_head(optimizer, iteration, ppo.learning_rate, value_head_args.value_warmup_iterations)
        if training.guard.finite_batch(checked, where):
            model.train()
            figures, update_tokens = ppo_update(
                accelerator, model, optimizer, training.guard, loss_fn, turns, batch, advantages, returns, ppo=ppo,
                parameters=trainable, where=where, units=stream_units(turns) if episode_context else None,
                value_only=value_only,
            )
            model.eval()
        update_time = time.time() - started

        # ---- 5. KL controller, metrics, rollout dataset
        episodes = rollout.episodes
        sums = training.reduce({
            "episodes": len(episodes), "return": sum(e["return"] for e in episodes),
            "normalized_score": sum(e["normalized_score"] for e in episodes), "won": sum(e["won"] for e in episodes),
            "length": sum(e["length"] for e in episodes), "invalid": sum(t.invalid for t in turns),
            "turns": len(turns), "generated_tokens": rollout.generated_tokens, "update_tokens": update_tokens,
        }, "sum")
        mean_kl = float(accelerator.reduce((kl * mask).sum(dim=1).mean().to(device), "mean"))
        kl_controller.update(mean_kl, int(sums["turns"]))
        local = {
            "objective/entropy": figures.mean("entropy"),
            "losses/policy_loss": figures.mean("policy_loss"),

            "losses/kl_loss": figures.mean("kl_loss"),
            "losses/approx_kl": figures.mean("approx_kl"),
            "losses/clipfrac": figures.mean("clipfrac"),

            "losses/grad_norm": figures.mean("grad_norm") if figures.counts.get("grad_norm") else 0.0,
            "objective/reward": float(batch["rewards"].mean()),
            "objective/advantage_mean": float(masked_mean(raw_advantages, mask)),
            "perf/rollout_s": rollout_time,
            "perf/update_s": update_time,
        }
        if with_critic:
            local.update({
                "losses/value_loss": figures.mean("value_loss"),
                "losses/value_clipfrac": figures.mean("value_clipfrac"),
                "losses/explained_variance": float(explained_variance(batch["values"], returns, mask).nan_to_num(0.0)),
            })
        metrics = training.reduce(local, "mean")
        training.state["env_steps"] += int(sums["turns"])
        training.state["episodes"] += int(sums["episodes"])
        iteration_time = rollout_time + update_time
        metrics.update({
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_controller.value,
            "losses/skipped_updates": training.guard.skipped,
            "charts/invalid_rate": sums["invalid"] / sums["turns"],
            "charts/env_steps": training.state["env_steps"],
            "perf/env_steps_per_s": sums["turns"] / iteration_time,
            "perf/generated_tokens_per_s": sums["generated_tokens"] / max(rollout_time, 1e-9),
            "perf/tokens_per_s": sums["update_tokens"] / max(update_time, 1e-9),
        })
        if sums["episodes"]:
            metrics.update({
                f"charts/{name}": sums[key] / sums["episodes"] for name, key in
                (("episodic_return", "return"), ("normalized_score", "normalized_score"), ("win_rate", "won"),
                 ("episode_length", "length"))
            })
        if curriculum.num_stages > 1:  # every process records the same episodes, so all move on together
            curriculum.record(gather_object([episode["won"] for episode in episodes]))
            metrics.update({"charts/curriculum/stage": curriculum.stage + 1,
                            "charts/curriculum/win_rate": curriculum.win_rate()})
            if curriculum.ready():
                curriculum.advance()
                accelerator.print(f"curriculum: stage {curriculum.stage + 1} of {curriculum.num_stages} from iteration "
                                  f"{iteration + 1} (win rate {metrics['charts/curriculum/win_rate']:.2f} over the "
                                  f"last {curriculum.window} training episodes)")
                env.close()
                env = stage_env()
                collector.use_env(env)
            training.state["curriculum"] = curriculum.state_dict()
        rows = gather_object(rollout_rows(turns, iteration, training.process_index, raw_advantages, returns, kl, mask))
        if accelerator.is_main_process:
            save_rollouts(rows, run.output_dir, iteration)

        # ---- periodic evaluation and checkpoint
        training.state["iteration"] = iteration
        training.state["kl_controller"] = kl_controller.state_dict()
        last = iteration == run.num_iterations
        if run.eval_every and iteration % run.eval_every == 0 and not last:
            metrics.update(training.evaluate_held_out(greedy_agent, model, prompts, tokenizer))
        training.log(metrics, step=iteration)
        bar.set_postfix({
            "reward": f"{metrics['objective/reward']:.3f}",
            "return": f"{metrics.get('charts/episodic_return', math.nan):.2f}",
            "win": f"{metrics.get('charts/win_rate', math.nan):.2f}",
            "kl": f"{mean_kl:.3f}",
            "pg": f"{metrics['losses/policy_loss']:.3f}",
            "sps": f"{metrics['perf/env_steps_per_s']:.2f}",
        })
        if run.save_every and iteration % run.save_every == 0 and not last:
            training.save_checkpoint(model, tokenizer, card(iteration), {"rollout": collector.state_dict()})
    bar.close()
    env.close()

    # ---- final evaluation, model, checkpoint, hub
    training.log(training.evaluate_held_out(greedy_agent, model, prompts, tokenizer, "after"), step=run.num_iterations)
    checkpoint = training.save_checkpoint(model, tokenizer, card(run.num_iterations), {"rollout": collector.state_dict()})
    training.finish(model, tokenizer, card(run.num_iterations), checkpoint, lambda: load_rollouts(run.output_dir))


if __name__ == "__main__":
    main_or_exit(main)
