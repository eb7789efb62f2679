"""Playing turns with the policy and caching what PPO needs, and the rollout dataset on disk.

One `RolloutCollector.collect(model, ref_model, turns_per_slot)` plays turns_per_slot turns in each of the B game
slots (or, with turns_per_slot None, whole episodes: each slot plays until the episode it is in ends, then holds
until every slot's has ended):

  for each turn:  prompt per playing slot  (lib.prompts.build_prompt: objective, cleaned observation, history)
                  -> lib.generation.generate on the policy (sampling; response ids through the stop token)
                  -> one no-grad forward of policy+value head and one of the reference over prompt+response
                     (lib.sequences.score_sequences)
                  -> env.step(commands) -> reward_fn (lib.rewards) -> one Transition per playing slot
  then one value-only forward over the prompts the next iteration starts from.

`ScoringRolloutCollector` (--action_mode score) plays the same turns with a policy over each state's candidate
commands (lib/scoring.py): one forward over the prompts and candidates of the policy+value head (the value at the
prompt's last token) and one of the reference, then a command sampled from softmax(scores / temperature); its
turns are one-token responses (logprobs, ref_logprobs, values hold the chosen command's entry) and keep the
candidates' token ids. The bootstraps below are the same, the final-state prompts riding along with a throwaway
candidate.

`play_episodes` plays whole episodes instead (rejection sampling's rounds): lib.evaluation.evaluate with the given
agent, each turn written down with its reward.

Positions and values: lib/sequences.py. Without a value head (critic-free advantages) values and next_value stay
None / NaN and no value-only forward runs.

Bootstrapping (next_value of a turn, used by GAE at its last response token):
  - the episode goes on: values[0] of the same slot's next turn (the value at its first response position);
  - terminated: 0, and done = True;
  - truncated (step limit or a crashed game): the value at the last token of the prompt built from the episode's
    FINAL state (StepResult.state) and the slot's history including this turn: the next turn already belongs to a
    new episode. Those prompts ride along as extra rows of the next turn's forward;
  - the rollout's last turn of an episode that goes on: the value-only forward after the last turn.
Every forward is one call per turn whatever happens in the games, so all processes make the same calls (ZeRO-3
gathers parameters collectively in each one) as long as every process plays the same number of turns: fixed
turns_per_slot, not whole episodes.

Groups (BatchEnv group_size G): the G slots of a group play the same game from the same start; a slot whose
episode ended waits (its state is None) until its group's have, and plays no turn meanwhile.

Histories (list of lib.prompts.Turn per slot) and the env's episodes persist across `collect` calls: the env is
never reset between iterations; a slot's history is cleared when its episode ends. `state_dict()` holds all of it
as JSON-ready data (with the env's, see lib/env.py) for a checkpoint; `load_state_dict` continues from there.

Rollout dataset: one row per turn, one `datasets` folder per iteration under `output_dir/rollouts/iteration-NNNNN`
(written under a temporary name, then renamed, so a crash never leaves half an iteration; rejection_sampling.py
writes its rounds the same way, as `round-NNNNN`). Columns: iteration, process, slot, game, env (the game's engine:
textworld, twx or sciworld), episode, turn (1 = first command of the episode), prompt, response, command, reward
(reward_fn), score (after the turn, a float for every engine, see lib/engines.py), max_score, done
(terminated), truncated, won, invalid, advantage (mean over the turn's response tokens, before whitening), return
(the value target at the turn's first response token; with group-relative advantages, the episode's return),
value (values[0]; NaN without a value head), logprob (sum
over response tokens), kl (sum of the per-token KL estimates against the reference). Score mode adds candidates
(the scored commands) and chosen_index; its advantage is the turn's, its logprob and kl those of the chosen command.
Episode context adds stream (its number within the iteration), stream_offset, prompt_ids (the turn's new tokens)
and response_ids: a stream's tokens are its turns' prompt_ids + response_ids in order, from offset 0.

Episode context (max_context_tokens given, lib/streams.py): the same turns, each slot reading its stream through
KV caches of the policy and the reference (one forward per slot and model per turn: `act_on_streams`); every
stream starts with the iteration; a truncated episode's final state is valued on its stream (a peek) before the
stream ends; the bootstrap after the last turn is the window prompt's, which is how the next iteration's streams
start.
"""

import contextlib
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lib.agents import Agent, candidate_commands, past_turn, place_of, played_at
from lib.engines import engine_of
from lib.env import BatchEnv, GameState, state_key
from lib.evaluation import evaluate, rank_episodes
from lib.generation import GenerationConfig, generate
from lib.prompts import PromptConfig, Turn, build_prompt, clean_observation, parse_command
from lib.rewards import RewardFn, TurnOutcome
from lib.scoring import (
    ScoringConfig,
    choose_candidate,
    encode_candidates,
    policy_logprobs,
    score_candidates,
)
from lib.sequences import score_sequences
from lib.streams import EpisodeContext, candidate_turn, generate_turn
from lib.trunk import shared_layers

ROLLOUTS_DIR = "rollouts"


@dataclass
class Transition:
    """One turn of one slot: what the model saw and said, what it was worth, and the cached per-token tensors (R,)
    (values None without a value head)."""

    slot: int
    game: str
    episode: int
    turn: int  # 1 = the episode's first command
    prompt: str
    response: str
    command: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    reward: float
    score: float
    max_score: float
    done: bool
    truncated: bool
    won: bool
    invalid: bool
    state_key: str  # lib.env.state_key of the state the turn was played from (GiGPO's step groups)
    next_value: float = math.nan
    # Score mode (ScoringRolloutCollector): the scored commands, the index of the chosen one and their answer token
    # ids; logprobs, ref_logprobs and values then hold one entry, the chosen command's log-probs and the value at the
    # prompt's last token.
    candidates: list[str] | None = None
    chosen_index: int | None = None
    candidate_ids: list[list[int]] | None = None
    # Episode context (lib/streams.py): prompt_ids are the turn's new tokens (the game's segment, or the start prompt
    # when its stream (re)starts); the stream's number and how many of its tokens came before them.
    stream: int | None = None
    stream_offset: int | None = None
    # The trunk states of the tokens the turn's forward read (lib/trunk.py), when the reference shares the policy's
    # trunk: what the update's forwards start from. Not saved with the rollout.
    trunk: torch.Tensor | None = None


@dataclass
class Rollout:
    """The transitions of one collect call in turn-major order (the playing slots' first turns, then their second
    turns, ...) and a summary of every episode that ended during it."""

    transitions: list[Transition]
    episodes: list[dict] = field(default_factory=list)
    generated_tokens: int = 0


class RolloutCollector:
    """Keeps the env, each slot's current state, history and running episode return between iterations.

    `reward_fn(TurnOutcome) -> float` is what a turn is worth (lib.rewards.reward_chain(config) for the built-in
    components, or the script's own function)."""

    def __init__(
        self,
        env: BatchEnv,
        tokenizer,
        prompt_config: PromptConfig,
        generation_config: GenerationConfig | None,
        reward_fn: RewardFn,
        generate_kwargs: dict | None = None,
        autocast=contextlib.nullcontext,
        max_context_tokens: int | None = None,
    ):
        """`max_context_tokens`: play with --context episode (lib/streams.py) within that many tokens per stream;
        None: --context window, a prompt built per turn."""
        self.tokenizer = tokenizer
        self.prompt_config = prompt_config
        self.generation_config = generation_config
        self.reward_fn = reward_fn
        self.context = None if max_context_tokens is None else EpisodeContext(
            env.num_envs, prompt_config, tokenizer, max_context_tokens, with_reference=True)
        self.generate_kwargs = generate_kwargs or {}
        self.autocast = autocast
        self.use_env(env)  # the slots' states, histories and running returns

    def use_env(self, env: BatchEnv) -> None:
        """Play `env`'s games from now on (a curriculum's next stage): every slot starts a new episode there."""
        self.env = env
        self.states = env.reset()
        self.histories = [[] for _ in self.states]
        self.returns = [0.0 for _ in self.states]
        if self.context is not None:
            for slot in range(len(self.states)):
                self.context.end(slot)

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

    def collect(self, model, ref_model, turns_per_slot: int | None) -> Rollout:
        """Play turns_per_slot turns in every playing slot, or with None whole episodes (see the module docstring);
        `model` is the (unwrapped) lib.value_head.PolicyWithValue, `ref_model` a plain LM."""
        has_values = model.value_head is not None
        rollout = Rollout([])
        previous: list[Transition] = []  # ongoing turns: bootstrapped by their slot's next turn
        pending: list[tuple[Transition, list[int]]] = []  # truncated turns and their final-state prompt ids
        ended: set[int] = set()  # whole episodes: the slots whose episode ended in this call hold
        turns_played = 0
        if self.context is not None:  # episode context: every stream starts with this iteration (lib/streams.py)
            for slot in range(len(self.states)):
                self.context.end(slot)
            self.context.streams.next_number = 0  # streams are numbered within their iteration
        while turns_per_slot is None or turns_played < turns_per_slot:
            playing = [slot for slot, state in enumerate(self.states) if state is not None and slot not in ended]
            if not playing:
                break
            turns_played += 1
            if self.context is None:
                prompts = [self.prompt(self.states[slot], self.histories[slot]) for slot in playing]
                acted, state_values = self.act(model, ref_model, playing, prompts, [ids for _, ids in pending])
            else:
                prompts = self.begin_streams(playing)
                acted, state_values = self.act_on_streams(model, ref_model, playing)
            self._bootstrap(previous, pending, playing, state_values)
            commands: list[str | None] = [None] * len(self.states)
            for slot, fields in zip(playing, acted):
                commands[slot] = fields["command"]
            results = self.env.step(commands)
            previous, pending = [], []
            for slot, fields, prompt in zip(playing, acted, prompts):
                result, before = results[slot], self.states[slot]
                reward = float(self.reward_fn(TurnOutcome(before, fields["command"], result, list(self.histories[slot]))))
                turn = Transition(
                    slot=slot, game=before.game, episode=before.episode, turn=result.state.steps, prompt=prompt,
                    **fields, reward=reward, score=result.state.score, max_score=result.state.max_score,
                    done=result.terminated, truncated=result.truncated, won=result.state.won, invalid=result.invalid,
                    state_key=state_key(before),
                )
                rollout.transitions.append(turn)
                rollout.generated_tokens += len(turn.response_ids)
                self.histories[slot].append(past_turn(before, turn.command, result.state))
                self.returns[slot] += turn.reward
                if result.terminated:
                    turn.next_value = 0.0
                elif result.truncated and has_values:
                    if self.context is None:
                        pending.append((turn, self.encode(self.prompt(result.state, self.histories[slot]))))
                    else:  # the final state read on the episode's stream, before it ends
                        with self.autocast(), torch.no_grad():
                            turn.next_value = self.context.peek_value(model, slot, result.state)
                elif not result.done:
                    previous.append(turn)
                if result.done:
                    rollout.episodes.append(self._episode_summary(turn))
                    self.histories[slot], self.returns[slot] = [], 0.0
                    if self.context is not None:
                        self.context.end(slot)
                    if turns_per_slot is None:
                        ended.add(slot)
            # A group's waiting slots get their new episode when its last slot ends: the env's states are the truth.
            self.states = list(self.env.states)
        if has_values:  # the states the next iteration starts from (with a window prompt, as its streams do) bootstrap
            # this iteration's last turns
            live = [slot for slot, state in enumerate(self.states) if state is not None]
            next_prompts = [self.encode(self.prompt(self.states[slot], self.histories[slot])) for slot in live]
            rows = next_prompts + [ids for _, ids in pending]
            with self.autocast():
                scored = score_sequences(model, None, rows, [[] for _ in rows], self.tokenizer.pad_token_id)
            self._bootstrap(previous, pending, live, scored["values"][:, 0])
        return rollout

    def reply_room(self, slot: int) -> int:
        """Tokens a reply of `slot` may take (the stream restarts rather than pass max_context_tokens with it)."""
        return self.generation_config.max_new_tokens

    def begin_streams(self, slots: list[int]) -> list[str]:
        """Episode context: each slot's stream takes the game's new tokens; the turns' prompt texts (those tokens
        decoded)."""
        texts, self.turn_ids = [], {}
        for slot in slots:
            self.turn_ids[slot] = self.context.begin(slot, self.states[slot], self.histories[slot], self.reply_room(slot))
            texts.append(self.tokenizer.decode(self.turn_ids[slot]))
        return texts

    def _stream_fields(self, slot: int) -> dict:
        """The Transition fields of this turn's stream tokens (before the reply joins the stream)."""
        streams = self.context.streams
        offset = len(streams.ids[slot]) - len(self.turn_ids[slot])
        return {"prompt_ids": self.turn_ids[slot], "stream": streams.numbers[slot], "stream_offset": offset}

    def act_on_streams(self, model, ref_model, slots: list[int]):
        """act() with --context episode (lib.streams.generate_turn): the same fields, and the values at each
        slot's last new token (the state's value) (None without a value head)."""
        pending = self.context.pending(slots)
        with self.autocast(), torch.no_grad():
            ref_cache = None if ref_model is None else self.context.ref_cache
            results = generate_turn(model.policy, ref_model, self.context.cache, ref_cache, pending,
                                    self.generation_config, self.tokenizer, model.value_head)
        acted = []
        for slot in slots:
            result, streams = results[slot], self.context.streams
            response_ids = result["response_ids"]
            text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
            fields = self._stream_fields(slot)
            streams.add_reply(slot, response_ids, cached=len(streams.ids[slot]) + len(response_ids) - 1)
            acted.append({"response": text, "command": parse_command(text), "response_ids": response_ids,
                          "logprobs": result["logprobs"], "ref_logprobs": result["ref_logprobs"],
                          "values": result["values"], **fields})
        has_values = model.value_head is not None
        return acted, torch.stack([fields["values"][0] for fields in acted]) if has_values else None

    def act(self, model, ref_model, slots: list[int], prompts: list[str], pending_ids: list[list[int]]):
        """One turn in each of `slots` (prompts aligned with them): per slot the Transition fields of what the policy
        did (response, command, prompt_ids, response_ids, logprobs, ref_logprobs, values), and the values at the last
        token of every prompt, then of the `pending_ids` prompts (truncated episodes' final states); None without a
        value head."""
        pad_id, temperature = self.tokenizer.pad_token_id, self.generation_config.temperature
        if not self.generation_config.do_sample:
            temperature = 1.0
        with self.autocast():
            generated = generate(model.policy, self.tokenizer, prompts, self.generation_config, **self.generate_kwargs)
            scored = score_sequences(
                model, ref_model, generated.prompt_ids + pending_ids, generated.response_ids + [[] for _ in pending_ids],
                pad_id, temperature,
            )
        values = scored["values"]
        acted = []
        for row in range(len(prompts)):
            length = len(generated.response_ids[row])
            acted.append({
                "response": generated.texts[row], "command": generated.commands[row],
                "prompt_ids": generated.prompt_ids[row], "response_ids": generated.response_ids[row],
                "logprobs": scored["logprobs"][row, :length], "ref_logprobs": scored["ref_logprobs"][row, :length],
                "values": None if values is None else values[row, :length],
            })
        return acted, None if values is None else values[:, 0]

    @staticmethod
    def _bootstrap(previous: list[Transition], pending, slots: list[int], first_values: torch.Tensor | None) -> None:
        """next_value of the last turn's ongoing turns (this turn's values[0] of the same slot; `slots` gives the slot
        of each row) and of its truncated turns (their final-state rows, after the len(slots) regular rows)."""
        if first_values is None:
            return
        row_of = {slot: row for row, slot in enumerate(slots)}
        for turn in previous:
            turn.next_value = float(first_values[row_of[turn.slot]])
        for k, (turn, _) in enumerate(pending):
            turn.next_value = float(first_values[len(slots) + k])

    def _episode_summary(self, turn: Transition) -> dict:
        return {
            "game": turn.game,
            "return": self.returns[turn.slot],
            "score": turn.score,
            "max_score": turn.max_score,
            "normalized_score": turn.score / turn.max_score if turn.max_score else 0.0,
            "won": turn.won,
            "length": turn.turn,
        }


class ScoringRolloutCollector(RolloutCollector):
    """The same turns, bootstraps and episodes as RolloutCollector, with score mode's policy: per turn, a command
    sampled from the softmax over the state's candidate commands (lib/scoring.py), the scores divided by the
    sampling temperature; the value is read at the prompt's last token of the same forward."""

    def __init__(self, env: BatchEnv, tokenizer, prompt_config: PromptConfig, scoring_config: ScoringConfig,
                 reward_fn: RewardFn, autocast=contextlib.nullcontext, max_context_tokens: int | None = None):
        super().__init__(env, tokenizer, prompt_config, None, reward_fn, autocast=autocast,
                         max_context_tokens=max_context_tokens)
        self.scoring_config = scoring_config
        self.turn_candidates: dict[int, tuple[list[str], list[list[int]]]] = {}

    def candidates(self, slot: int) -> tuple[list[str], list[list[int]]]:
        """The state's candidate commands (lib.agents.candidate_commands; with least_tried, those the episode played
        least often at this place) and their answer ids."""
        config = self.scoring_config
        played = played_at(place_of(self.states[slot]), self.histories[slot]) if config.least_tried else ()
        commands = candidate_commands(self.states[slot], config.max_candidates, played=played)
        return commands, encode_candidates([commands], self.prompt_config, self.tokenizer)[0]

    def reply_room(self, slot: int) -> int:
        self.turn_candidates[slot] = self.candidates(slot)
        return max(map(len, self.turn_candidates[slot][1]))

    def act_on_streams(self, model, ref_model, slots):
        config = self.scoring_config
        pending = self.context.pending(slots)
        candidate_ids = [self.turn_candidates[slot][1] if slot in self.turn_candidates and slot in slots else None
                         for slot in range(len(pending))]
        layers = shared_layers(model.policy, ref_model)
        trunks = [None] * len(pending)
        with self.autocast(), torch.no_grad():
            if layers:  # the reference reads the policy's trunk (lib/trunk.py)
                scores, values, ref_scores, trunks = candidate_turn(
                    model.policy, self.context.cache, pending, candidate_ids, length_normalize=config.length_normalize,
                    value_head=model.value_head, shared=(ref_model, self.context.ref_cache, layers))
            else:
                scores, values = candidate_turn(model.policy, self.context.cache, pending, candidate_ids,
                                                length_normalize=config.length_normalize, value_head=model.value_head)
                ref_scores = None
                if ref_model is not None:
                    ref_scores, _ = candidate_turn(ref_model, self.context.ref_cache, pending, candidate_ids,
                                                   length_normalize=config.length_normalize)
        acted = []
        for slot in slots:
            commands, ids = self.turn_candidates.pop(slot)
            logprobs = policy_logprobs(scores[slot], config.temperature).cpu()
            ref_logprobs = None if ref_scores is None else policy_logprobs(ref_scores[slot], config.temperature).cpu()
            index = choose_candidate(logprobs, do_sample=True)  # temperature already applied
            fields = self._stream_fields(slot)
            self.context.streams.add_reply(slot, ids[index], cached=len(self.context.streams.ids[slot]))
            acted.append({
                "response": commands[index], "command": commands[index], "response_ids": ids[index],
                "logprobs": logprobs[index : index + 1],
                "ref_logprobs": None if ref_logprobs is None else ref_logprobs[index : index + 1],
                "values": None if values[slot] is None else values[slot].reshape(1).float().cpu(),
                "candidates": commands, "chosen_index": index, "candidate_ids": ids, "trunk": trunks[slot], **fields,
            })
        return acted, None if model.value_head is None else torch.stack([fields["values"][0] for fields in acted])

    def act(self, model, ref_model, slots, prompts, pending_ids):
        config = self.scoring_config
        candidates, candidate_ids = map(list, zip(*[self.candidates(slot) for slot in slots]))
        prompt_ids = [self.encode(prompt) for prompt in prompts]
        # Truncated episodes' final states ride along for their values, each with a throwaway one-token candidate:
        # every process then makes the same forward calls whatever its games do (ZeRO-3 pairs them up).
        throwaway = [[[self.tokenizer.eos_token_id]] for _ in pending_ids]
        with self.autocast(), torch.no_grad():
            scored = score_candidates(
                model, ref_model, prompt_ids + pending_ids, candidate_ids + throwaway, self.tokenizer.pad_token_id,
                config.length_normalize, config.temperature, trunk_layers=shared_layers(model.policy, ref_model),
            )
        trunks = scored.pop("trunks") or [None] * len(prompts)
        scored = {key: None if value is None else value.cpu() for key, value in scored.items()}
        values = scored["values"]
        acted = []
        for row, commands in enumerate(candidates):
            logprobs = scored["logprobs"][row, : len(commands)]
            ref_logprobs = scored["ref_logprobs"][row, : len(commands)]
            index = choose_candidate(logprobs, do_sample=True)  # temperature already applied
            acted.append({
                "response": commands[index], "command": commands[index], "prompt_ids": prompt_ids[row],
                "response_ids": candidate_ids[row][index], "logprobs": logprobs[index : index + 1],
                "ref_logprobs": ref_logprobs[index : index + 1],
                "values": None if values is None else values[row : row + 1],
                "candidates": commands, "chosen_index": index, "candidate_ids": candidate_ids[row],
                "trunk": trunks[row],
            })
        return acted, values


class _RewardRecorder(Agent):
    """Plays like `agent` and writes down every turn with its reward (for `play_episodes`)."""

    name = "model"
    needs_prompts = True

    def __init__(self, agent: Agent, reward_fn: RewardFn, episode_ids: list[int]):
        self.agent = agent
        self.reward_fn = reward_fn
        self.episode_ids = episode_ids  # this process's episode k is global episode episode_ids[k]
        self.states: list[GameState | None] = []
        self.prompts: list[str | None] = []
        self.commands: list[str | None] = []
        self.histories: dict[int, list[Turn]] = {}  # per slot, its episode's turns so far (for reward_fn)
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
            history = self.histories.setdefault(slot, [])
            self.turns.append({
                "game": after.game, "env": engine_of(after.game), "episode": self.episode_ids[after.episode],
                "turn": after.steps,
                "prompt": self.prompts[slot], "response": responses[slot], "command": result.command,
                "reward": float(self.reward_fn(TurnOutcome(before, result.command, result, list(history)))),
                "score": float(after.score), "max_score": float(after.max_score), "won": after.won,
                "invalid": result.invalid,
                "done": result.done,
            })
            history.append(past_turn(before, result.command, after))
            if result.done:
                history.clear()


def play_episodes(
    agent: Agent,
    games: list[str],
    num_episodes: int,
    num_envs: int,
    max_episode_turns: int,
    prompt_config: PromptConfig,
    tokenizer,
    reward_fn: RewardFn,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> tuple[list[dict], dict]:
    """Play `num_episodes` whole episodes (over all processes) with `agent`, as lib.evaluation.evaluate does: the
    same prompts, the same share of episodes per process and game. Returns this process's turns and its report.

    A turn: game (file or game string), env (its engine, lib.engines), episode (global number), turn (1 = first command), prompt, response (raw text), command,
    reward (reward_fn), score and max_score after it, won, invalid, done (its episode ended there).
    """
    recorder = _RewardRecorder(agent, reward_fn, rank_episodes(num_episodes, len(games), process_index, num_processes))
    result = evaluate(
        recorder, games, num_episodes, num_envs, max_episode_turns, prompt_config, tokenizer=tokenizer, seed=seed,
        rank=process_index, world_size=num_processes, progress=False,
    )
    return recorder.turns, result.report


def rollout_rows(
    transitions: list[Transition],
    iteration: int,
    process_index: int,
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
            "iteration": iteration, "process": process_index, "slot": t.slot, "game": t.game,
            "env": engine_of(t.game), "episode": t.episode, "turn": t.turn, "prompt": t.prompt, "response": t.response,
            "command": t.command, "reward": t.reward, "score": float(t.score), "max_score": float(t.max_score),
            "done": t.done, "truncated": t.truncated, "won": t.won,
            "invalid": t.invalid, "advantage": float(mean_advantages[i]), "return": float(returns[i, 0]),
            "value": math.nan if t.values is None else float(t.values[0]), "logprob": float(t.logprobs.sum()),
            "kl": float(kl_sums[i]),
        })
        if t.candidates is not None:
            rows[-1].update(candidates=t.candidates, chosen_index=t.chosen_index)
        if t.stream is not None:  # a stream is its turns' prompt_ids + response_ids in order, from offset 0
            rows[-1].update(stream=t.stream, stream_offset=t.stream_offset, prompt_ids=t.prompt_ids,
                            response_ids=t.response_ids)
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
    return concatenate_datasets([_current_columns(load_from_disk(str(part)), prefix) for part in parts])


def _current_columns(dataset, prefix: str):
    """A part written before the columns changed (step -> turn, 0-based nowhere in these datasets; PPO's process
    index rank -> process; integer scores, no env column before the other engines), in today's columns, so that old
    and new iterations concatenate."""
    from datasets import Value

    renames = {"step": "turn"}
    if prefix == "iteration":
        renames["rank"] = "process"
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old in dataset.column_names})
    for column in ("score", "max_score"):
        if column in dataset.column_names and dataset.features[column].dtype != "float64":
            dataset = dataset.cast_column(column, Value("float64"))
    if "game" in dataset.column_names and "env" not in dataset.column_names:
        dataset = dataset.add_column("env", [engine_of(game) for game in dataset["game"]])
    return dataset
