"""Flags the training scripts share: how the policy is prompted, samples and is rewarded (one dataclass, so every
trainer plays with the same prompts and rewards), reading flags from the command line or a YAML file, and the checks
of the shared flags. Each check raises ValueError naming the flag; nothing here loads a model or a game.
"""

import dataclasses
import importlib.util
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lib.generation import GenerationConfig
from lib.prompts import PROMPT_FORMATS, PromptConfig
from lib.rewards import REWARD_NAMES, RewardConfig, parse_reward_names
from lib.scoring import ACTION_MODES, ScoringConfig
from lib.streams import CONTEXTS

TRACKERS = ("tensorboard", "wandb", "trackio", "none")
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


@dataclass
class RolloutArguments:
    # score, not generate: at the default budget on a CPU only scoring beats the random-admissible baseline
    # (README "Results"); generate mode spends its first iterations learning to write a command at all.
    action_mode: str = field(default="score", metadata={"help": f"How the policy acts: {' or '.join(ACTION_MODES)} (write a command, or choose among the admissible commands by their log-probs, lib/scoring.py)."})
    max_candidates: int = field(default=ScoringConfig.max_candidates, metadata={"help": "Score mode: admissible commands scored per turn at most (over it: verbs in turn, the objects the state's text mentions first; examine/look/inventory last)."})
    length_normalize: bool = field(default=ScoringConfig.length_normalize, metadata={"help": "Score mode: a command's score is the mean of its tokens' log-probs instead of the sum."})
    least_tried: bool = field(default=ScoringConfig.least_tried, metadata={"help": "Score mode: choose among the commands the episode played least often at the same place (untried ones first; greedy policies stop looping)."})
    max_new_tokens: int = field(default=10, metadata={"help": "Longest response in tokens (generation stops at a newline)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (1: off)."})
    prompt_format: str = field(default="chat", metadata={"help": f"Prompt format: {', '.join(PROMPT_FORMATS)}."})
    # 1, not the library's 3: prompt length dominates CPU time, and the default games need little memory.
    memory_turns: int = field(default=1, metadata={"help": "Past turns of the episode shown in the prompt."})
    hint: bool = field(default=True, metadata={"help": "List the admissible commands in the prompt."})
    hint_examine: bool = field(default=False, metadata={"help": "Keep examine/look/inventory in the hint list."})
    mark_tried: bool = field(default=False, metadata={"help": "Say in the prompt which commands the episode already played from the same observation (window context)."})
    num_examples: int = field(default=PromptConfig.num_examples, metadata={"help": "Generic example turns in the prompt (SmolLM2 answers in prose without them)."})
    max_prompt_tokens: int = field(default=256, metadata={"help": "Prompt token budget (memory, then observation, are cut)."})
    context: str = field(default="window", metadata={"help": f"What the policy reads each turn: {' or '.join(CONTEXTS)} (a prompt built per turn, or the episode's conversation as one growing token stream with a KV cache, lib/streams.py)."})
    max_context_tokens: int = field(default=1024, metadata={"help": "Episode context: a stream restarts from the window prompt (last memory_turns turns) rather than grow past this many tokens."})
    reward: str = field(default="score,win,invalid", metadata={"help": f"Comma list of reward components: {', '.join(REWARD_NAMES)}."})
    score_weight: float = field(default=1.0, metadata={"help": "Weight of the score change (reward `score`)."})
    win_bonus: float = field(default=1.0, metadata={"help": "Bonus for winning (reward `win`)."})
    lose_penalty: float = field(default=1.0, metadata={"help": "Penalty for losing (reward `lose`)."})
    living_cost: float = field(default=0.01, metadata={"help": "Cost per step (reward `living`)."})
    invalid_penalty: float = field(default=0.1, metadata={"help": "Penalty for a non-admissible or no-op command (reward `invalid`)."})
    letter_e_weight: float = field(default=1.0, metadata={"help": "Reward per letter e in the command (reward `letter_e`)."})
    revisit_penalty: float = field(default=0.1, metadata={"help": "Penalty for a command that leads back to an observation already seen in the episode (reward `revisit`)."})


def generation_config(rollout: RolloutArguments, greedy: bool = False) -> GenerationConfig:
    if greedy:
        return GenerationConfig(max_new_tokens=rollout.max_new_tokens, do_sample=False)
    return GenerationConfig(rollout.max_new_tokens, True, rollout.temperature, rollout.top_k, rollout.top_p)


def scoring_config(rollout: RolloutArguments, greedy: bool = False) -> ScoringConfig:
    """Score mode's choice: sampled from the softmax over the candidates' scores at the sampling temperature, or the
    best candidate."""
    return ScoringConfig(rollout.max_candidates, rollout.length_normalize, not greedy, rollout.temperature,
                         rollout.least_tried)


def prompt_config(rollout: RolloutArguments) -> PromptConfig:
    return PromptConfig(
        rollout.prompt_format, rollout.memory_turns, rollout.hint, rollout.hint_examine, rollout.num_examples,
        rollout.max_prompt_tokens, rollout.mark_tried,
    )


def reward_config(rollout: RolloutArguments) -> RewardConfig:
    return RewardConfig(
        parse_reward_names(rollout.reward), rollout.score_weight, rollout.win_bonus, rollout.lose_penalty,
        rollout.living_cost, rollout.invalid_penalty, rollout.letter_e_weight, rollout.revisit_penalty,
    )


def check_action_flags(flags) -> None:
    """--action_mode and the flags only score mode reads, on any flags object that has them (the trainers'
    RolloutArguments, play.py's Args)."""
    if flags.action_mode not in ACTION_MODES:
        raise ValueError(f"--action_mode {flags.action_mode!r} is unknown; choose one of {', '.join(ACTION_MODES)}")
    if flags.least_tried and flags.action_mode != "score":
        raise ValueError("--least_tried narrows the admissible commands that score mode chooses from: use it with "
                         "--action_mode score")


def check_context_flags(flags) -> None:
    """--context and the flags that depend on it, on any flags object that has them (the trainers' RolloutArguments,
    play.py's Args)."""
    if flags.context not in CONTEXTS:
        raise ValueError(f"--context {flags.context!r} is unknown; choose one of {', '.join(CONTEXTS)}")
    if flags.context == "episode" and flags.max_context_tokens < 2 * flags.max_prompt_tokens:
        raise ValueError(
            f"--max_context_tokens {flags.max_context_tokens} must be at least twice --max_prompt_tokens "
            f"({flags.max_prompt_tokens}): a stream starts from a window prompt and needs room for turns after it"
        )
    if flags.context == "episode" and flags.mark_tried:
        raise ValueError("--mark_tried is for --context window: with --context episode the policy reads the whole "
                         "episode already; drop one of the two")


def check_rollout_arguments(rollout: RolloutArguments) -> None:
    check_action_flags(rollout)
    check_context_flags(rollout)
    if rollout.action_mode == "score":
        try:
            scoring_config(rollout)
        except ValueError as error:
            raise ValueError(f"score mode flags: {error}") from None
    for flag, build in (("generation flags", lambda: generation_config(rollout)), ("prompt flags", lambda: prompt_config(rollout)),
                        ("--reward", lambda: reward_config(rollout))):
        try:
            build()
        except ValueError as error:
            raise ValueError(f"{flag}: {error}") from None


def check_report_to(report_to: str) -> None:
    if report_to not in TRACKERS:
        raise ValueError(f"--report_to {report_to!r} is unknown; choose one of {', '.join(TRACKERS)}")
    if report_to in TRACKER_MODULES and importlib.util.find_spec(TRACKER_MODULES[report_to]) is None:
        raise ValueError(f"--report_to {report_to} needs the {TRACKER_MODULES[report_to]} package: pip install it or pass --report_to none")


def check_push_to_hub(repo_id: str | None) -> None:
    if repo_id is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ValueError(f"--push_to_hub {repo_id!r} is not a repo id (name or owner/name)")


# Old flag names that still work for one release (with a warning): they meant "turn" where they said "step".
DEPRECATED_FLAGS = {"num_steps": "turns_per_slot", "max_episode_steps": "max_episode_turns"}


def renamed_flags(argv: list[str]) -> list[str]:
    """argv with every deprecated flag name replaced by its new one, warning once per name on stderr."""
    import sys

    renamed = []
    for item in argv:
        name, separator, value = item.partition("=")
        old = name.removeprefix("--")
        if name.startswith("--") and old in DEPRECATED_FLAGS:
            new = DEPRECATED_FLAGS[old]
            print(f"warning: --{old} is deprecated and will be removed in the next release; use --{new}", file=sys.stderr)
            item = f"--{new}{separator}{value}"
        renamed.append(item)
    return renamed


def parse_arguments(dataclass_types: tuple, argv: list[str]) -> tuple:
    """One instance per dataclass, from command-line flags, or from a YAML file given first (its keys are flag names)
    followed by flags that override it. Deprecated flag names (DEPRECATED_FLAGS) are renamed with a warning. A flag
    whose type admits None (`float | None`, ...) takes `none` (or YAML `null`) for None; elsewhere a YAML `null`
    keeps the default."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    # From the annotations: HfArgumentParser rewrites the dataclass fields' types in place (`float | None` -> float).
    optional = {name for t in dataclass_types for name, hint in typing.get_type_hints(t).items()
                if type(None) in getattr(hint, "__args__", ())}
    set_to_none = set()
    if argv and argv[0].endswith((".yaml", ".yml")):
        values = yaml_values(argv[0])
        set_to_none = {key for key, value in values.items() if value is None and key in optional}
        argv = yaml_flags(argv[0]) + argv[1:]
    argv = renamed_flags(argv)
    kept = []
    for item in argv:
        flag, equals, value = item.partition("=")
        if item.startswith("--") and equals:  # --name=value, one item
            name = flag.removeprefix("--")
        else:  # the value of the --name item before it (or a flag)
            name = kept[-1].removeprefix("--") if kept and kept[-1].startswith("--") else None
            value = item
        if name in optional and value.lower() in ("none", "null"):
            set_to_none.add(name)
            if not equals:
                kept.pop()
        else:
            set_to_none.discard(flag.removeprefix("--") if equals else name)  # a later value overrides a YAML null
            kept.append(item)
    *parsed, unknown = parser.parse_args_into_dataclasses(args=kept, return_remaining_strings=True)
    if unknown:
        raise ValueError(f"unknown flag(s) or argument(s) {' '.join(unknown)}; see --help for the flags")
    for group in parsed:
        for name in set_to_none & {f.name for f in dataclasses.fields(group)}:
            setattr(group, name, None)
    return tuple(parsed)


def yaml_values(path: str) -> dict:
    """A YAML file of `flag_name: value` lines as a dict."""
    if not os.path.isfile(path):
        raise ValueError(f"config file not found: {path}; check the path, or pass the flags on the command line")
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ValueError(f"config file {path} is not valid YAML ({problem}); fix its syntax") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold `flag_name: value` lines, not a {type(values).__name__}")
    return values


def yaml_flags(path: str) -> list[str]:
    """A YAML file of `flag_name: value` lines as command-line flags (null values left out). Each is one
    `--name=value` item: YAML reads `-1e-5` as a string, which argparse would take for a flag if it came apart."""
    return [f"--{key}={value}" for key, value in yaml_values(path).items() if value is not None]


def check_finite_numbers(groups: tuple) -> None:
    """Every float flag of the parsed dataclasses (`groups`) must be a number: inf or nan would train nothing (and
    NaN passes no range check, as every comparison with it is false). Run it before the scripts' own checks."""
    for group in groups:
        for item in dataclasses.fields(group):
            value = getattr(group, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{item.name} must be a finite number, got {value}")


def check_no_negative_counts(groups: tuple) -> None:
    """Every int flag (counts, sizes, seeds, intervals) must be >= 0. Run it after the scripts' own checks, which
    name a flag's group more precisely where they have one."""
    for group in groups:
        for item in dataclasses.fields(group):
            value = getattr(group, item.name)
            if type(value) is int and value < 0:  # not a bool
                raise ValueError(f"--{item.name} must be >= 0, got {value}")
