"""Playing turns with the policy, caching what PPO needs per response token, and the rollout dataset on disk.

One `RolloutCollector.collect(model, ref_model, turns_per_slot)` plays turns_per_slot turns in each of the B env slots:

  for each step:  prompt per slot  (lib.prompts.build_prompt: objective, cleaned observation, history)
                  -> lib.generation.generate on the policy (sampling; response ids through the stop token)
                  -> one no-grad forward of policy+value head and one of the reference over prompt+response
                  -> env.step(commands) -> reward chain (lib.rewards) -> one Transition per slot
  then one value-only forward over the prompts the next iteration starts from.

`ScoringRolloutCollector` (PPO's --action_mode score) plays the same turns with a policy over each state's candidate
commands (lib/scoring.py): one forward over the prompts and candidates of the policy+value head (the value at the
prompt's last token) and one of the reference, then a command sampled from softmax(scores / temperature); its
turns are one-token responses (logprobs, ref_logprobs, values hold the chosen command's entry) and keep the
candidates' log-probs. The bootstraps below are the same, the final-state prompts riding along with a throwaway
candidate.

`play_episodes` plays whole episodes instead (rejection sampling's rounds): lib.evaluation.evaluate with the given
agent, each turn written down with its reward-chain total.

Positions. A turn's sequence is its prompt p (P tokens) followed by its response r (R tokens). Response token j is
predicted from position P-1+j, so
  logprobs[j]     = log pi(r_j | p, r_<j)        logits at P-1+j divided by the sampling temperature
  ref_logprobs[j] = the same under the reference model
  values[j]       = value head at P-1+j          values[0]: the last prompt token = value of the turn's state

Bootstrapping (next_value of a turn, used by GAE at its last response token):
  - the episode goes on: values[0] of the same slot's next turn (the value at its first response position);
  - terminated: 0, and done = True;
  - truncated (step limit or a crashed game): the value at the last token of the prompt built from the episode's
    FINAL state (StepResult.state) and the slot's history including this turn: the next turn already belongs to a
    new episode. Those prompts ride along as extra rows of the next step's forward;
  - the rollout's last turn of an episode that goes on: the value-only forward after the last step.
Every forward is one call per step whatever happens in the games, so all processes make the same calls (ZeRO-3
gathers parameters collectively in each one).

Histories (list of lib.prompts.Turn per slot) and the env's episodes persist across `collect` calls: the env is
never reset between iterations; a slot's history is cleared when its episode ends. `state_dict()` holds all of it
as JSON-ready data (with the env's, see lib/env.py) for a checkpoint; `load_state_dict` continues from there.

Rollout dataset: one row per turn, one `datasets` folder per iteration under `output_dir/rollouts/iteration-NNNNN`
(written under a temporary name, then renamed, so a crash never leaves half an iteration; rejection_sampling.py
writes its rounds the same way, as `round-NNNNN`). Columns: iteration, rank,
slot, game, episode, step (1 = first command of the episode), prompt, response, command, reward (reward chain
total), score (after the step), max_score, done (terminated), truncated, won, invalid, advantage (MEAN over the
turn's response tokens of the token advantages, before whitening), return (at the first response token: the value
target of the turn's state), value (values[0]), logprob (sum over response tokens), kl (sum of the per-token KL
estimates against the reference). Score mode adds candidates (the scored commands) and chosen_index; its advantage
is the turn's (turn-level GAE), its logprob and kl those of the chosen command.
"""

import contextlib
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lib.agents import FALLBACK_COMMAND, Agent
from lib.env import BatchEnv, GameState
from lib.evaluation import evaluate, rank_episodes
from lib.generation import GenerationConfig, generate
from lib.losses import logprobs_from_logits, turn_gae
from lib.prompts import PromptConfig, Turn, build_prompt, clean_observation
from lib.rewards import RewardConfig, compute_reward
from lib.scoring import (
    ScoringConfig,
    candidate_logprobs,
    choose_candidate,
    encode_candidates,
    policy_logprobs,
    select_candidates,
)
from lib.value_head import response_logits

ROLLOUTS_DIR = "rollouts"


@dataclass
class Transition:
    """One turn of one slot: what the model saw and said, what it cost, and the cached per-token tensors (R,)."""

    slot: int
    game: str
    episode: int
    step: int
    prompt: str
    response: str
    command: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    reward: float
    reward_components: dict[str, float]
    score: int
    max_score: int
    done: bool
    truncated: bool
    won: bool
    invalid: bool
    next_value: float = math.nan
    # Score mode (ScoringRolloutCollector): the scored commands, the index of the chosen one, their answer token ids,
    # and the behaviour and reference log-probs over them (K,); logprobs, ref_logprobs and values then hold one entry,
    # the chosen command's log-probs and the value at the prompt's last token.
    candidates: list[str] | None = None
    chosen_index: int | None = None
    candidate_ids: list[list[int]] | None = None
    candidate_logprobs: torch.Tensor | None = None
    ref_candidate_logprobs: torch.Tensor | None = None


@dataclass
class Rollout:
    """The transitions of one collect call in step-major order (all slots of step 0, then step 1, ...) and a summary
    of every episode that ended during it."""

    transitions: list[Transition]
    episodes: list[dict] = field(default_factory=list)
    generated_tokens: int = 0


def pack_sequences(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, response_width: int | None = None
) -> dict:
    """Model inputs for prompt+response rows: [left pad][prompt][response][right pad].

    Returns input_ids, attention_mask, position_ids (B, L); response_ids, response_mask (B, T) with
    T = response_width or the longest response (at least 1, so that an empty response still reads the value at
    its prompt's last token); and start, end: the positions whose outputs predict response tokens 0..T-1.
    """
    prompt_width = max(len(ids) for ids in prompt_ids)
    width = response_width or max(1, max(len(ids) for ids in response_ids))
    rows, masks, responses, response_masks = [], [], [], []
    for prompt, response in zip(prompt_ids, response_ids):
        left, right = prompt_width - len(prompt), width - len(response)
        rows.append([pad_id] * left + prompt + response + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        responses.append(response + [pad_id] * right)
        response_masks.append([1] * len(response) + [0] * right)
    attention_mask = torch.tensor(masks)
    # Positions count real tokens only, as generate() does for left-padded prompts.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_ids": torch.tensor(responses),
        "response_mask": torch.tensor(response_masks, dtype=torch.bool),
        "start": prompt_width - 1,
        "end": prompt_width - 1 + width,
    }


@torch.no_grad()
def score_sequences(model, ref_model, prompt_ids, response_ids, pad_id: int, temperature: float = 1.0) -> dict:
    """Behaviour log-probs, reference log-probs (None without ref_model) and values per response token, (B, T)."""
    device = next(model.parameters()).device
    packed = pack_sequences(prompt_ids, response_ids, pad_id)
    inputs = [packed[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")]
    labels = packed["response_ids"].to(device)
    logits, values = model(*inputs, packed["start"], packed["end"])
    scored = {
        "logprobs": logprobs_from_logits(logits.float() / temperature, labels),
        "values": values.float(),
        "mask": packed["response_mask"],
        "ref_logprobs": None,
    }
    if ref_model is not None:
        ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"])
        scored["ref_logprobs"] = logprobs_from_logits(ref_logits.float() / temperature, labels)
    return {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in scored.items()}


class RolloutCollector:
    """Keeps the env, each slot's current state, history and running episode return between iterations."""

    def __init__(
        self,
        env: BatchEnv,
        tokenizer,
        prompt_config: PromptConfig,
        generation_config: GenerationConfig,
        reward_config: RewardConfig,
        generate_kwargs: dict | None = None,
        autocast=contextlib.nullcontext,
    ):
        self.env = env
        self.tokenizer = tokenizer
        self.prompt_config = prompt_config
        self.generation_config = generation_config
        self.reward_config = reward_config
        self.generate_kwargs = generate_kwargs or {}
        self.autocast = autocast
        self.states: list[GameState] = env.reset()
        self.histories: list[list[Turn]] = [[] for _ in self.states]
        self.returns = [0.0 for _ in self.states]

    def state_dict(self) -> dict:
        return {
            "env": self.env.state_dict(),
            "histories": [[asdict(turn) for turn in history] for history in self.histories],
            "returns": list(self.returns),
        }

    def load_state_dict(self, state: dict) -> None:
        self.states = self.env.load_state_dict(state["env"])
        self.histories = [[Turn(**turn) for turn in history] for history in state["histories"]]
        self.returns = list(state["returns"])

    def prompt(self, state: GameState, history: list[Turn]) -> str:
        observation = clean_observation(state.observation, state.objective)
        return build_prompt(
            state.objective, observation, state.inventory, state.admissible_commands, history,
            self.prompt_config, self.tokenizer,
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def collect(self, model, ref_model, turns_per_slot: int) -> Rollout:
        """Play turns_per_slot turns in every slot; `model` is the (unwrapped) PolicyWithValue, `ref_model` a plain LM."""
        pad_id = self.tokenizer.pad_token_id
        rollout = Rollout([])
        previous: list[Transition] = []
        pending: list[tuple[Transition, list[int]]] = []  # truncated turns and their final-state prompt ids
        for _ in range(turns_per_slot):
            if any(state is None for state in self.states):
                raise RuntimeError("an env slot went idle during training: do not set num_episodes on the train env")
            prompts = [self.prompt(state, history) for state, history in zip(self.states, self.histories)]
            acted, state_values = self.act(model, ref_model, prompts, [ids for _, ids in pending])
            num_slots = len(prompts)
            self._bootstrap(previous, pending, state_values, num_slots)
            results = self.env.step([fields["command"] for fields in acted])
            previous, pending = [], []
            for slot, result in enumerate(results):
                before = self.states[slot]
                components = compute_reward(result, acted[slot]["command"], self.reward_config, before)
                turn = Transition(
                    slot=slot, game=before.game, episode=before.episode, step=result.state.steps, prompt=prompts[slot],
                    **acted[slot], reward=components["total"], reward_components=components,
                    score=result.state.score, max_score=result.state.max_score, done=result.terminated,
                    truncated=result.truncated, won=result.state.won, invalid=result.invalid,
                )
                rollout.transitions.append(turn)
                rollout.generated_tokens += len(turn.response_ids)
                self.histories[slot].append(Turn(clean_observation(before.observation, before.objective), turn.command))
                self.returns[slot] += turn.reward
                if result.terminated:
                    turn.next_value = 0.0
                elif result.truncated:
                    pending.append((turn, self.encode(self.prompt(result.state, self.histories[slot]))))
                else:
                    previous.append(turn)
                if result.done:
                    rollout.episodes.append(self._episode_summary(turn))
                    self.histories[slot], self.returns[slot] = [], 0.0
                self.states[slot] = result.next_state
        # The states the next iteration starts from bootstrap this iteration's last turns.
        next_prompts = [self.encode(self.prompt(state, history)) for state, history in zip(self.states, self.histories)]
        with self.autocast():
            scored = score_sequences(
                model, None, next_prompts + [ids for _, ids in pending], [[] for _ in next_prompts + pending], pad_id
            )
        self._bootstrap(previous, pending, scored["values"][:, 0], len(next_prompts))
        return rollout

    def act(self, model, ref_model, prompts: list[str], pending_ids: list[list[int]]):
        """One turn in every slot: per slot the Transition fields of what the policy did (response, command,
        prompt_ids, response_ids, logprobs, ref_logprobs, values), and the values at the last token of every prompt,
        then of the `pending_ids` prompts (truncated episodes' final states)."""
        pad_id, temperature = self.tokenizer.pad_token_id, self.generation_config.temperature
        if not self.generation_config.do_sample:
            temperature = 1.0
        with self.autocast():
            generated = generate(model.policy, self.tokenizer, prompts, self.generation_config, **self.generate_kwargs)
            scored = score_sequences(
                model, ref_model, generated.prompt_ids + pending_ids, generated.response_ids + [[] for _ in pending_ids],
                pad_id, temperature,
            )
        acted = []
        for slot in range(len(prompts)):
            length = len(generated.response_ids[slot])
            acted.append({
                "response": generated.texts[slot], "command": generated.commands[slot],
                "prompt_ids": generated.prompt_ids[slot], "response_ids": generated.response_ids[slot],
                "logprobs": scored["logprobs"][slot, :length], "ref_logprobs": scored["ref_logprobs"][slot, :length],
                "values": scored["values"][slot, :length],
            })
        return acted, scored["values"][:, 0]

    @staticmethod
    def _bootstrap(previous: list[Transition], pending, first_values: torch.Tensor, num_slots: int) -> None:
        """next_value of the last step's ongoing turns (this step's values[0] of the same slot) and of its truncated
        turns (their final-state rows, after the num_slots regular rows)."""
        for turn in previous:
            turn.next_value = float(first_values[turn.slot])
        for k, (turn, _) in enumerate(pending):
            turn.next_value = float(first_values[num_slots + k])

    def _episode_summary(self, turn: Transition) -> dict:
        return {
            "game": turn.game,
            "return": self.returns[turn.slot],
            "score": turn.score,
            "max_score": turn.max_score,
            "normalized_score": turn.score / turn.max_score if turn.max_score else 0.0,
            "won": turn.won,
            "length": turn.step,
        }


class ScoringRolloutCollector(RolloutCollector):
    """The same turns, bootstraps and episodes as RolloutCollector, with score mode's policy: per turn, a command
    sampled from the softmax over the state's candidate commands (lib/scoring.py), the scores divided by the
    sampling temperature; the value is read at the prompt's last token of the same forward."""

    def __init__(self, env: BatchEnv, tokenizer, prompt_config: PromptConfig, scoring_config: ScoringConfig,
                 reward_config: RewardConfig, autocast=contextlib.nullcontext):
        super().__init__(env, tokenizer, prompt_config, None, reward_config, autocast=autocast)
        self.scoring_config = scoring_config

    def act(self, model, ref_model, prompts, pending_ids):
        config = self.scoring_config
        # A state without admissible commands still gets a turn, as ScoringAgent gives it: the harmless fallback.
        candidates = [select_candidates(state.admissible_commands, config.max_candidates) or [FALLBACK_COMMAND]
                      for state in self.states]
        prompt_ids = [self.encode(prompt) for prompt in prompts]
        candidate_ids = encode_candidates(candidates, self.prompt_config, self.tokenizer)
        # Truncated episodes' final states ride along for their values, each with a throwaway one-token candidate:
        # every process then makes the same forward calls whatever its games do (ZeRO-3 pairs them up).
        throwaway = [[[self.tokenizer.eos_token_id]] for _ in pending_ids]
        with self.autocast(), torch.no_grad():
            scored = score_candidates(
                model, ref_model, prompt_ids + pending_ids, candidate_ids + throwaway, self.tokenizer.pad_token_id,
                config.length_normalize, config.temperature,
            )
        scored = {key: value.cpu() for key, value in scored.items()}
        acted = []
        for slot, commands in enumerate(candidates):
            logprobs = scored["logprobs"][slot, : len(commands)]
            ref_logprobs = scored["ref_logprobs"][slot, : len(commands)]
            index = choose_candidate(logprobs, do_sample=True)  # temperature already applied
            acted.append({
                "response": commands[index], "command": commands[index], "prompt_ids": prompt_ids[slot],
                "response_ids": candidate_ids[slot][index], "logprobs": logprobs[index : index + 1],
                "ref_logprobs": ref_logprobs[index : index + 1], "values": scored["values"][slot : slot + 1],
                "candidates": commands, "chosen_index": index, "candidate_ids": candidate_ids[slot],
                "candidate_logprobs": logprobs, "ref_candidate_logprobs": ref_logprobs,
            })
        return acted, scored["values"]


def score_candidates(model, ref_model, prompt_ids: list[list[int]], candidate_ids: list[list[list[int]]], pad_id: int,
                     length_normalize: bool, temperature: float) -> dict:
    """The policy over each state's candidates: logprobs (S, K) = log softmax(scores / temperature) over its K_s
    candidates (0 in the padding), mask (S, K), values (S,) at the prompts' last tokens from the same forward, and
    ref_logprobs (S, K) under `ref_model` (None without it, always computed without gradient). `model` is the
    PolicyWithValue (wrapped or not); differentiable through it."""
    scores, values = model(candidates={"prompt_ids": prompt_ids, "candidate_ids": candidate_ids, "pad_id": pad_id,
                                       "length_normalize": length_normalize})
    scored = {"logprobs": _pad_rows([policy_logprobs(s, temperature) for s in scores]),
              "mask": _pad_rows([torch.ones(len(s), dtype=torch.bool, device=s.device) for s in scores]),
              "values": values.float(), "ref_logprobs": None}
    if ref_model is not None:
        with torch.no_grad():
            ref_scores = candidate_logprobs(ref_model, prompt_ids, candidate_ids, pad_id, length_normalize)
        scored["ref_logprobs"] = _pad_rows([policy_logprobs(s, temperature) for s in ref_scores])
    return scored


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


class _RewardRecorder(Agent):
    """Plays like `agent` and writes down every turn with its reward-chain total (for `play_episodes`)."""

    name = "model"
    needs_prompts = True

    def __init__(self, agent: Agent, reward_config: RewardConfig, episode_ids: list[int]):
        self.agent = agent
        self.reward_config = reward_config
        self.episode_ids = episode_ids  # this rank's episode k is global episode episode_ids[k]
        self.states: list[GameState | None] = []
        self.prompts: list[str | None] = []
        self.commands: list[str | None] = []
        self.turns: list[dict] = []

    def act(self, states, prompts):
        self.states, self.prompts = states, prompts
        self.commands = self.agent.act(states, prompts)
        return self.commands

    def responses(self, commands):
        return self.agent.responses(commands)

    def observe(self, results):
        responses = self.agent.responses(self.commands)
        for slot, result in enumerate(results):
            if result is None:
                continue
            before, after = self.states[slot], result.state
            self.turns.append({
                "game": after.game, "episode": self.episode_ids[after.episode], "step": after.steps,
                "prompt": self.prompts[slot], "response": responses[slot], "command": result.command,
                "reward": compute_reward(result, result.command, self.reward_config, before)["total"],
                "score": after.score, "max_score": after.max_score, "won": after.won, "invalid": result.invalid,
                "done": result.done,
            })


def play_episodes(
    agent: Agent,
    games: list[str],
    num_episodes: int,
    num_envs: int,
    max_episode_turns: int,
    prompt_config: PromptConfig,
    tokenizer,
    reward_config: RewardConfig,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[dict], dict]:
    """Play `num_episodes` whole episodes (over all ranks) with `agent`, as lib.evaluation.evaluate does: the same
    prompts, the same share of episodes per rank and game. Returns this rank's turns and its evaluation report.

    A turn: game (file), episode (global number), step (1 = first command), prompt, response (raw text), command,
    reward (reward-chain total), score and max_score after it, won, invalid, done (its episode ended there).
    """
    recorder = _RewardRecorder(agent, reward_config, rank_episodes(num_episodes, len(games), rank, world_size))
    result = evaluate(
        recorder, games, num_episodes, num_envs, max_episode_turns, prompt_config, tokenizer=tokenizer, seed=seed,
        rank=rank, world_size=world_size, progress=False,
    )
    return recorder.turns, result.report


def collate(transitions: list[Transition], pad_id: int) -> dict[str, torch.Tensor]:
    """The rollout as right-padded (N, T) tensors (response_ids, mask, logprobs, ref_logprobs, values) and (N,)
    tensors (rewards, dones, next_values); T = the longest response."""
    width = max(len(t.response_ids) for t in transitions)

    def pad(rows, value=0.0, dtype=torch.float32):
        return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=dtype)

    return {
        "response_ids": pad([t.response_ids for t in transitions], pad_id, torch.long),
        "mask": pad([[True] * len(t.response_ids) for t in transitions], False, torch.bool),
        "logprobs": pad([t.logprobs.tolist() for t in transitions]),
        "ref_logprobs": pad([t.ref_logprobs.tolist() for t in transitions]),
        "values": pad([t.values.tolist() for t in transitions]),
        "rewards": torch.tensor([t.reward for t in transitions], dtype=torch.float32),
        "dones": torch.tensor([t.done for t in transitions], dtype=torch.float32),
        "next_values": torch.tensor([t.next_value for t in transitions], dtype=torch.float32),
    }


def collate_candidates(transitions: list[Transition]) -> dict[str, torch.Tensor]:
    """A score-mode rollout as tensors: each turn is one decision, a one-token response, so logprobs, ref_logprobs
    (of the chosen command), values (at the prompt's last token) and mask are (N, 1), as `collate` gives them in
    generate mode; rewards, dones, truncateds, next_values, chosen (its index) are (N,); candidate_logprobs,
    ref_candidate_logprobs and candidate_mask (N, K) cover each turn's candidates, right-padded."""
    return {
        "mask": torch.ones(len(transitions), 1, dtype=torch.bool),
        "logprobs": torch.stack([t.logprobs for t in transitions]).float(),
        "ref_logprobs": torch.stack([t.ref_logprobs for t in transitions]).float(),
        "values": torch.stack([t.values for t in transitions]).float(),
        "rewards": torch.tensor([t.reward for t in transitions], dtype=torch.float32),
        "dones": torch.tensor([t.done for t in transitions], dtype=torch.float32),
        "truncateds": torch.tensor([t.truncated for t in transitions], dtype=torch.float32),
        "next_values": torch.tensor([t.next_value for t in transitions], dtype=torch.float32),
        "chosen": torch.tensor([t.chosen_index for t in transitions]),
        "candidate_logprobs": _pad_rows([t.candidate_logprobs for t in transitions]).float(),
        "ref_candidate_logprobs": _pad_rows([t.ref_candidate_logprobs for t in transitions]).float(),
        "candidate_mask": _pad_rows([torch.ones(len(t.candidates), dtype=torch.bool) for t in transitions]),
    }


def turn_advantages(rewards: torch.Tensor, batch: dict, num_slots: int, gamma: float, lam: float):
    """Turn-level GAE (lib.losses.turn_gae) of a score-mode rollout. Its turns are step-major (all slots of step 0,
    then step 1, ...), so each slot's turns, reshaped into a row, are time-ordered; a truncation stops the recursion
    (the next turn is another episode's) after bootstrapping from next_value. rewards: (N,) turn rewards, KL penalty
    included; batch: collate_candidates. Returns (advantages, returns), (N, 1) like `batch["values"]`."""

    def by_slot(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, num_slots).T

    advantages, returns = turn_gae(
        by_slot(rewards), by_slot(batch["values"][:, 0]), torch.ones_like(by_slot(rewards)), by_slot(batch["next_values"]),
        by_slot(batch["dones"]), gamma, lam, by_slot(batch["truncateds"]),
    )
    return advantages.T.reshape(-1, 1), returns.T.reshape(-1, 1)


def rollout_rows(
    transitions: list[Transition],
    iteration: int,
    rank: int,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
) -> list[dict]:
    """One dataset row per turn; advantages, returns, kl, mask: (N, T) tensors aligned with `transitions`."""
    lengths = mask.sum(dim=1).clamp(min=1)
    mean_advantages = (advantages * mask).sum(dim=1) / lengths
    kl_sums = (kl * mask).sum(dim=1)
    rows = []
    for i, t in enumerate(transitions):
        rows.append({
            "iteration": iteration, "rank": rank, "slot": t.slot, "game": t.game, "episode": t.episode,
            "step": t.step, "prompt": t.prompt, "response": t.response, "command": t.command, "reward": t.reward,
            "score": t.score, "max_score": t.max_score, "done": t.done, "truncated": t.truncated, "won": t.won,
            "invalid": t.invalid, "advantage": float(mean_advantages[i]), "return": float(returns[i, 0]),
            "value": float(t.values[0]), "logprob": float(t.logprobs.sum()), "kl": float(kl_sums[i]),
        })
        if t.candidates is not None:
            rows[-1].update(candidates=t.candidates, chosen_index=t.chosen_index)
    return rows


def save_rollouts(rows: list[dict], output_dir: str | Path, iteration: int, prefix: str = "iteration") -> Path:
    """Write one iteration's rows as `output_dir/rollouts/PREFIX-NNNNN` (replacing a stale one from a run that
    crashed before its checkpoint)."""
    from datasets import Dataset

    folder = Path(output_dir) / ROLLOUTS_DIR
    target = folder / f"{prefix}-{iteration:05d}"
    temporary = folder / f".tmp-{prefix}-{iteration:05d}"
    shutil.rmtree(temporary, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(str(temporary))
    if target.exists():
        shutil.rmtree(target)
    os.replace(temporary, target)
    return target


def load_rollouts(folder: str | Path, prefix: str = "iteration"):
    """All iterations (or rounds: prefix `round`) saved under `folder` (an output dir or its rollouts/ folder) as one
    `datasets.Dataset`."""
    from datasets import concatenate_datasets, load_from_disk

    folder = Path(folder)
    if (folder / ROLLOUTS_DIR).is_dir():
        folder = folder / ROLLOUTS_DIR
    parts = sorted(folder.glob(f"{prefix}-*"))
    if not parts:
        raise FileNotFoundError(f"no rollouts in {folder}: expected {prefix}-NNNNN folders written by a training script")
    return concatenate_datasets([load_from_disk(str(part)) for part in parts])
