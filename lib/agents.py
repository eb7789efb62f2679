"""Agents that play the batched games: random, the walkthrough, a human at the keyboard, a language model.

Every agent has `name`, `needs_prompts` (whether `act` reads the built prompts), `max_envs` (None: any batch size)
and `act(states, prompts) -> commands`, one entry per slot of the BatchEnv; idle slots (state None) get None.
`observe(results)` sees every step's results (the human agent shows how an episode ended), `responses(commands)`
gives the raw text behind the latest commands, for transcripts.
"""

import random

from lib.env import GameState, StepResult
from lib.generation import Generated, GenerationConfig, generate
from lib.prompts import clean_inventory, clean_observation

# What an agent without a better idea sends: harmless in every TextWorld game.
FALLBACK_COMMAND = "look"
QUIT_COMMANDS = ("quit", "exit", "q")
HELP_COMMAND = "help"


class SessionEnded(Exception):
    """The human quit (typed `quit` or closed the input); the evaluation stops and reports the finished episodes."""


class Agent:
    name = "agent"
    needs_prompts = False
    max_envs: int | None = None

    def act(self, states: list[GameState | None], prompts: list[str | None]) -> list[str | None]:
        raise NotImplementedError

    def observe(self, results: list[StepResult | None]) -> None:
        """Called with the results of every step; agents that learn nothing from them ignore it."""

    def responses(self, commands: list[str | None]) -> list[str | None]:
        """The raw text behind each of the latest commands (a model's output before parsing); else the commands."""
        return commands


class RandomAgent(Agent):
    """Uniform over the admissible commands, with its own random generator."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def act(self, states, prompts):
        return [
            None if state is None else self.rng.choice(state.admissible_commands or [FALLBACK_COMMAND])
            for state in states
        ]


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
