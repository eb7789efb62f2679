"""Agents that play the batched games: random, the walkthrough, a human at the keyboard, a language model.

Every agent has `name`, `needs_prompts` (whether `act` reads the built prompts), `max_envs` (None: any batch size)
and `act(states, prompts) -> commands`, one entry per slot of the BatchEnv; idle slots (state None) get None.
`observe(results)` sees every step's results (the human agent shows how an episode ended), `responses(commands)`
gives the raw text behind the latest commands and `transcript_columns(slot)` any extra columns of a slot's latest
turn, for transcripts.
"""

import abc
import random
from collections import Counter

import torch

from lib.env import GameState, StepResult
from lib.generation import Generated, GenerationConfig, generate
from lib.prompts import PromptConfig, Turn, clean_inventory, clean_observation, parse_command
from lib.scoring import ScoringConfig, candidate_logprobs, choose_candidate, encode_candidates, select_candidates
from lib.streams import EpisodeContext, candidate_turn, generate_turn

# What an agent without a better idea sends: harmless in every TextWorld game.
FALLBACK_COMMAND = "look"
QUIT_COMMANDS = ("quit", "exit", "q")
HELP_COMMAND = "help"
# Each exit's direction and the one leading back (TextWorld's and TextWorldExpress's maps are grids).
OPPOSITE_DIRECTIONS = {"north": "south", "south": "north", "east": "west", "west": "east", "up": "down", "down": "up",
                       "northeast": "southwest", "southwest": "northeast", "northwest": "southeast",
                       "southeast": "northwest"}


def candidate_commands(state: GameState, max_candidates: int, *, played: list[str] = ()) -> list[str]:
    """The commands score mode weighs in `state`: its admissible ones played least often in `played` (what the
    episode played at this state's place, repeats included: ScoringConfig.least_tried, `played_at`), under the cap
    (lib.scoring.select_candidates, relevance read from the objective, observation and inventory); a state without
    admissible commands still gets a turn, with the harmless fallback as its one candidate."""
    context = "\n".join((state.objective, state.observation, state.inventory))
    return select_candidates(least_played(state.admissible_commands, played), max_candidates, context=context) or [
        FALLBACK_COMMAND]


def least_played(commands: list[str], played: list[str]) -> list[str]:
    """The `commands` that occur least often in `played`: the untried ones while there are, so that a policy choosing
    among them tries each command of a place before it repeats one (and round-robins them after)."""
    counts = Counter(played)
    fewest = min((counts[command] for command in commands), default=0)
    return [command for command in commands if counts[command] == fewest]


def place_of(state: GameState) -> str:
    """Where a turn is played, as --least_tried counts: the engine's location (TextWorld's room, the same after `look`
    or `inventory`), else the cleaned observation."""
    return state.location or clean_observation(state.observation, state.objective)


def past_turn(before: GameState, command: str, after: GameState) -> Turn:
    """The turn that played `command` in `before` and led to `after`, as an episode's history keeps it."""

    def situation(state: GameState) -> tuple:
        return place_of(state), state.score, clean_inventory(state.inventory), tuple(state.admissible_commands)

    start = situation(before)  # computed once: its place is the turn's
    return Turn(clean_observation(before.observation, before.objective), command, place=start[0],
                changed=start != situation(after))


def way_back(command: str) -> str | None:
    """The command that undoes a move (`go east` -> `go west`), or None for a command that names no direction."""
    words = command.split()
    back = [OPPOSITE_DIRECTIONS.get(word, word) for word in words]
    return " ".join(back) if back != words else None


def played_at(place: str, history: list[Turn]) -> list[str]:
    """What --least_tried counts as played at `place`, from the episode's turns so far (which end at `place`),
    repeats included: the commands played there; for each arrival there from elsewhere, the way back (the exit came
    in by, which a depth-first explorer leaves for last); and every command that changed nothing where it was
    played, wherever that was (`look`, `inventory`: once in an episode tells what they tell)."""
    arrivals = [turn.place for turn in history[1:]] + [place]
    played = []
    for turn, arrival in zip(history, arrivals):
        if turn.place == place or not turn.changed:
            played.append(turn.command)
        elif arrival == place and (back := way_back(turn.command)) is not None:
            played.append(back)
    return played


class SessionEnded(Exception):
    """The human quit (typed `quit` or closed the input); the evaluation stops and reports the finished episodes."""


class Agent(abc.ABC):
    name = "agent"
    needs_prompts = False
    max_envs: int | None = None

    @abc.abstractmethod
    def act(self, states: list[GameState | None], prompts: list[str | None]) -> list[str | None]:
        """One command per active slot (None for an idle slot)."""

    def observe(self, results: list[StepResult | None]) -> None:
        """Called with the results of every step; agents that learn nothing from them ignore it."""

    def responses(self, commands: list[str | None]) -> list[str | None]:
        """The raw text behind each of the latest commands (a model's output before parsing); else the commands."""
        return commands

    def transcript_columns(self, slot: int) -> dict:
        """Extra transcript columns for the latest turn of `slot`; every turn of one agent has the same keys."""
        return {}


class WalkthroughAgent(Agent):
    """Replays the walkthrough tw-make stored in the game: step i sends walkthrough[i], then `look` past its end."""

    name = "walkthrough"

    def act(self, states, prompts):
        commands = []
        for state in states:
            if state is None:
                commands.append(None)
            elif state.walkthrough and state.steps < len(state.walkthrough):
                commands.append(state.walkthrough[state.steps])
            else:
                commands.append(FALLBACK_COMMAND)
        return commands


class HumanAgent(Agent):
    """A person at the keyboard: shows the cleaned game text and reads one command per turn."""

    name = "human"
    max_envs = 1

    def __init__(self, input_fn=input, print_fn=print):
        self.input_fn = input_fn
        self.print_fn = print_fn

    def act(self, states, prompts):
        if len(states) != 1:
            raise ValueError(f"the human agent plays one game at a time, got {len(states)} slots; use num_envs=1")
        state = states[0]
        if state is None:
            return [None]
        if state.steps == 0:
            self.print_fn(f"\n=== episode {state.episode + 1}: {state.game}\nGoal: {state.objective}")
        self.print_fn("\n" + clean_observation(state.observation, state.objective))
        inventory = clean_inventory(state.inventory)
        if inventory:
            self.print_fn(inventory)
        self.print_fn(f"[score {state.score}/{state.max_score}, moves {state.moves}; '{HELP_COMMAND}' lists commands]")
        while True:
            try:
                command = self.input_fn("> ").strip().lower()
            except EOFError:
                raise SessionEnded from None
            if command in QUIT_COMMANDS:
                raise SessionEnded
            if command == HELP_COMMAND:
                self.print_fn("Possible commands: " + ", ".join(state.admissible_commands))
            elif command:
                return [command]

    def observe(self, results):
        result = results[0]
        if result is not None and result.done:
            final = result.state
            self.print_fn("\n" + clean_observation(final.observation, final.objective))
            ending = "won" if final.won else "lost" if final.lost else "out of steps" if result.truncated else "over"
            self.print_fn(f"*** episode {ending}: score {final.score}/{final.max_score} in {final.steps} steps")


class ModelAgent(Agent):
    """A causal LM answering the prompts of the active slots in one batched `generate` call."""

    name = "model"
    needs_prompts = True

    def __init__(self, model, tokenizer, generation_config: GenerationConfig, **generate_kwargs):
        self.model = model
        self.tokenizer = tokenizer
        self.generation_config = generation_config
        self.generate_kwargs = generate_kwargs
        self.last: Generated | None = None  # the latest batch, for transcripts (raw response texts, token ids)
        self.texts: list[str | None] = []  # the latest raw response per slot, None for idle slots

    def act(self, states, prompts):
        active = [slot for slot, prompt in enumerate(prompts) if prompt is not None and states[slot] is not None]
        commands: list[str | None] = [None] * len(states)
        self.texts = [None] * len(states)
        if not active:
            if self.generate_kwargs.get("synced_gpus"):
                # ZeRO-3: every process must join every generate call, so an idle one runs a throwaway prompt.
                generate(self.model, self.tokenizer, [self.tokenizer.pad_token], self.generation_config,
                         **self.generate_kwargs)
            return commands
        self.last = generate(
            self.model, self.tokenizer, [prompts[slot] for slot in active], self.generation_config,
            **self.generate_kwargs,
        )
        for slot, command, text in zip(active, self.last.commands, self.last.texts):
            commands[slot], self.texts[slot] = command, text
        return commands

    def responses(self, commands):
        return list(self.texts)


class _EpisodeMemory(Agent):
    """Keeps each slot's turns of its current episode (cleaned observation, command: as the prompts show them), from
    the states `act` saw (`_remember`) and the results `observe` gets."""

    def __init__(self):
        self.histories: list[list[Turn]] = []  # per slot
        self.last_states: list[GameState | None] = []  # per slot, the state of its latest command

    def _remember(self, states: list[GameState | None]) -> None:
        if len(self.histories) != len(states):
            self.histories = [[] for _ in states]
        self.last_states = list(states)

    def observe(self, results):
        for slot, result in enumerate(results):
            if result is None:
                continue
            self.histories[slot].append(past_turn(self.last_states[slot], result.command, result.state))
            if result.done:
                self.histories[slot] = []


class RandomAgent(_EpisodeMemory):
    """Uniform over the admissible commands, with its own random generator; with `least_tried`, over those its episode
    played least often at the same place (as score mode's --least_tried)."""

    name = "random"

    def __init__(self, seed: int = 0, least_tried: bool = False):
        super().__init__()
        self.rng = random.Random(seed)
        self.least_tried = least_tried

    def act(self, states, prompts):
        self._remember(states)
        commands = []
        for slot, state in enumerate(states):
            if state is None:
                commands.append(None)
                continue
            played = played_at(place_of(state), self.histories[slot]) if self.least_tried else ()
            commands.append(self.rng.choice(least_played(state.admissible_commands, played) or [FALLBACK_COMMAND]))
        return commands


class ScoringAgent(_EpisodeMemory):
    """A causal LM choosing among the admissible commands: each candidate scored by lib.scoring (the active slots'
    prompts and all their candidates in two forwards), then the best one, or one sampled from the softmax over the
    scores with `do_sample`; with `least_tried`, among those its episode played least often at the same place.
    Transcripts add each turn's `candidates` and `chosen_index`."""

    name = "model-score"
    needs_prompts = True

    def __init__(self, model, tokenizer, prompt_config: PromptConfig, scoring_config: ScoringConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_config = prompt_config  # the answer's end-of-reply token depends on the prompt format
        self.scoring_config = scoring_config
        self.candidates: list[list[str] | None] = []  # per slot, the latest scored commands (None: idle)
        self.chosen: list[int | None] = []  # per slot, the index of the latest command among them

    def slot_candidates(self, slot: int, state: GameState) -> list[str]:
        """The commands scored for `slot` in `state`: lib.agents.candidate_commands, with least_tried the ones the
        slot's episode played least often at this place."""
        config = self.scoring_config
        played = played_at(place_of(state), self.histories[slot]) if config.least_tried else ()
        return candidate_commands(state, config.max_candidates, played=played)

    def act(self, states, prompts):
        config = self.scoring_config
        self._remember(states)
        active = [slot for slot, prompt in enumerate(prompts) if prompt is not None and states[slot] is not None]
        self.candidates, self.chosen = [None] * len(states), [None] * len(states)
        if not active:
            return [None] * len(states)
        for slot in active:
            self.candidates[slot] = self.slot_candidates(slot, states[slot])
        prompt_ids = [self.tokenizer(prompts[slot], add_special_tokens=False)["input_ids"] for slot in active]
        candidate_ids = encode_candidates([self.candidates[slot] for slot in active], self.prompt_config, self.tokenizer)
        with torch.no_grad():
            scores = candidate_logprobs(self.model, prompt_ids, candidate_ids, self.tokenizer.pad_token_id,
                                        config.length_normalize)
        for slot, slot_scores in zip(active, scores):
            self.chosen[slot] = choose_candidate(slot_scores, config.do_sample, config.temperature)
        return [None if index is None else self.candidates[slot][index] for slot, index in enumerate(self.chosen)]

    def transcript_columns(self, slot):
        return {"candidates": self.candidates[slot], "chosen_index": self.chosen[slot]}


class _EpisodeContextAgent(_EpisodeMemory):
    """--context episode for a model agent: each slot's episode is one token stream read through a KV cache
    (lib/streams.py), so the agent reads the states, not per-turn prompts. It keeps the episode's turns (a restart's
    prompt shows the last ones) and ends a stream with its episode."""

    needs_prompts = False

    def _begin(self, states, reply_room) -> list[int]:
        """The active slots, each slot's stream given this turn's tokens (`reply_room(slot)`: its longest reply); the
        states are remembered (`_remember`) already."""
        if self.context is None or len(self.context.streams.ids) != len(states):
            self.context = EpisodeContext(len(states), self.prompt_config, self.tokenizer, self.max_context_tokens)
        active = [slot for slot, state in enumerate(states) if state is not None]
        for slot in active:
            self.context.begin(slot, states[slot], self.histories[slot], reply_room(slot))
        return active

    def observe(self, results):
        super().observe(results)
        for slot, result in enumerate(results):
            if result is not None and result.done:
                self.context.end(slot)


class EpisodeScoringAgent(_EpisodeContextAgent, ScoringAgent):
    """ScoringAgent with --context episode: the candidates scored on each slot's stream (lib.streams.candidate_turn)."""

    def __init__(self, model, tokenizer, prompt_config: PromptConfig, scoring_config: ScoringConfig,
                 max_context_tokens: int):
        ScoringAgent.__init__(self, model, tokenizer, prompt_config, scoring_config)
        self.max_context_tokens = max_context_tokens
        self.context = None

    def act(self, states, prompts):
        config = self.scoring_config
        self._remember(states)
        self.candidates, self.chosen = [None] * len(states), [None] * len(states)
        candidate_ids: list[list[list[int]] | None] = [None] * len(states)
        for slot, state in enumerate(states):
            if state is not None:
                self.candidates[slot] = self.slot_candidates(slot, state)
                candidate_ids[slot] = encode_candidates([self.candidates[slot]], self.prompt_config, self.tokenizer)[0]
        active = self._begin(states, lambda slot: max(map(len, candidate_ids[slot])))
        if not active:
            return [None] * len(states)
        with torch.no_grad():
            scores, _ = candidate_turn(self.model, self.context.cache, self.context.pending(active), candidate_ids,
                                       length_normalize=config.length_normalize)
        streams = self.context.streams
        for slot in active:
            self.chosen[slot] = choose_candidate(scores[slot], config.do_sample, config.temperature)
            streams.add_reply(slot, candidate_ids[slot][self.chosen[slot]], cached=len(streams.ids[slot]))
        return [None if index is None else self.candidates[slot][index] for slot, index in enumerate(self.chosen)]


class EpisodeModelAgent(_EpisodeContextAgent, ModelAgent):
    """ModelAgent with --context episode: each reply generated on its slot's stream (lib.streams.generate_turn)."""

    def __init__(self, model, tokenizer, prompt_config: PromptConfig, generation_config: GenerationConfig,
                 max_context_tokens: int):
        ModelAgent.__init__(self, model, tokenizer, generation_config)
        _EpisodeMemory.__init__(self)
        self.prompt_config = prompt_config
        self.max_context_tokens = max_context_tokens
        self.context = None

    def act(self, states, prompts):
        self._remember(states)
        active = self._begin(states, lambda slot: self.generation_config.max_new_tokens)
        commands: list[str | None] = [None] * len(states)
        self.texts = [None] * len(states)
        if not active:
            return commands
        with torch.no_grad():
            results = generate_turn(self.model, None, self.context.cache, None, self.context.pending(active),
                                    self.generation_config, self.tokenizer)
        streams = self.context.streams
        for slot in active:
            response_ids = results[slot]["response_ids"]
            streams.add_reply(slot, response_ids, cached=len(streams.ids[slot]) + len(response_ids) - 1)
            self.texts[slot] = self.tokenizer.decode(response_ids, skip_special_tokens=True)
            commands[slot] = parse_command(self.texts[slot])
        return commands
