"""Play text games (TextWorld, TextWorldExpress, ScienceWorld) with an agent (random, the walkthrough or gold path,
you, or a language model) and report how it did.

    python play.py --agent random --games default --num_episodes 12
    python play.py --agent walkthrough --output_dir outputs/walkthrough
    python play.py --agent random --games twx-coin:numLocations=5:n=4,sciworld-boil:n=2
    python play.py --agent human --games tiny
    python play.py --agent model --model_name_or_path outputs/ppo --output_dir outputs/eval
    python play.py --agent model --action_mode generate  # write commands instead of choosing admissible ones
    python play.py my_eval.yaml --seed 1             # flags from a YAML file, then overrides

Prints a table per game (normalized score, win rate, steps per episode, share of non-admissible commands). With
--output_dir it writes `report.json` (the report and the args) and `transcripts/`, one row per turn, readable with
`datasets.load_from_disk`; --push_to_hub REPO_ID (with --output_dir, so that a failed upload loses nothing) uploads
the transcripts as a Hub dataset (log in first with `hf auth login`; the login and the Hub are checked at the start).
Bad flags stop the run with `error: ...` and exit code 2 before any model is loaded, and so does an --output_dir that
another run is using or that holds a report.json or transcripts/ that no textworld-rl run wrote
(--overwrite_output_dir replaces them). Ctrl-C (SIGINT) or SIGTERM stops it cleanly: the finished episodes are
printed and written (`"partial": true`), the game processes end, and the exit code is 130 (SIGINT) or 143 (SIGTERM).

`--action_mode score` makes the model choose among the admissible commands (at most --max_candidates, scored by the
sum, or with --length_normalize the mean, of their tokens' log-probs): the best one, or with --do_sample one sampled
from the softmax over the scores at --temperature; with --least_tried, among the commands its episode played least
often at the same place (the untried ones first: a greedy choice otherwise repeats itself in a deterministic game;
README "Admissible-command scoring" says what counts). Its transcripts add each turn's `candidates` and `chosen_index`.

A model from a training output folder plays the way it was trained: the prompt and scoring settings (TRAINING_SETTINGS)
default to those in the training_args.json of the folder it loads, unless given as flags; one printed line and
report.json's `settings_source` say where each came from.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from datasets import Dataset
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import HfArgumentParser, set_seed

from lib.agents import (
    EpisodeModelAgent,
    EpisodeScoringAgent,
    HumanAgent,
    ModelAgent,
    RandomAgent,
    ScoringAgent,
    WalkthroughAgent,
)
from lib.arguments import (
    RolloutArguments,
    check_action_flags,
    check_context_flags,
    check_finite_numbers,
    check_no_negative_counts,
    parse_arguments,
    renamed_flags,
    yaml_flags,
)
from lib.env import GameProcessError
from lib.evaluation import evaluate, format_report_table
from lib.games import GameError, check_game_source, default_cache_dir, resolve_games
from lib.generation import GenerationConfig
from lib.hub import check_push_flag, push_failure_message
from lib.models import (
    DEFAULT_MODEL,
    DTYPES,
    ModelError,
    fit_tokenizer_to_model,
    load_model,
    load_tokenizer,
    resolve_model,
)
from lib.prompts import PROMPT_FORMATS, PromptConfig, check_prompt_budget
from lib.run_folder import (
    check_games_dir,
    check_no_foreign_outputs,
    check_writable_folder,
    lock_output_dir,
    record_outputs,
    release_output_dirs,
)
from lib.scoring import ScoringConfig
from lib.streams import CONTEXTS
from lib.stopping import Stopped, stop_signals_held, stop_signals_raise
from lib.training import ARGS_FILE

AGENTS = ("random", "walkthrough", "human", "model")
SPLITS = ("train", "eval")
REPORT_FILE = "report.json"
TRANSCRIPTS_DIR = "transcripts"
PLAY_OUTPUTS = (REPORT_FILE, TRANSCRIPTS_DIR)  # what --output_dir gets; never a user's files of these names
# How a trained model was prompted and chose its commands: played otherwise, it meets prompts it never saw. The
# sampling flags stay play.py's (greedy by default), as the trainers' own evaluation plays greedily too.
TRAINING_SETTINGS = ("memory_turns", "num_examples", "hint", "hint_examine", "max_prompt_tokens", "max_candidates",
                     "length_normalize", "prompt_format", "action_mode", "max_new_tokens", "context",
                     "max_context_tokens", "mark_tried", "least_tried")
FROM_COMMAND_LINE, FROM_DEFAULT = "command line", "default"


@dataclass
class Args:
    agent: str = field(default="model", metadata={"help": f"who plays: one of {', '.join(AGENTS)}"})
    games: str = field(
        default="default",
        metadata={"help": "named set (default, tiny, coin, twx, sciworld-easy, ...), generator spec "
                          "(tw-coin_collector:level=5:n=8, twx-coin:numLocations=5:n=8, sciworld-boil:n=4; a twx- "
                          "or sciworld- spec's eval split is the engine's dev fold, its test fold with "
                          ":eval_fold=test), or game files / folders / globs, comma-joined"},
    )
    split: str = field(default="eval", metadata={"help": "which split of a named set or spec: eval or train"})
    num_episodes: int | None = field(
        default=None,
        metadata={"help": "episodes to play in all (episode k plays game k mod #games); default: one per game"},
    )
    num_envs: int = field(default=8, metadata={"help": "games played in parallel (the human agent always plays one)"})
    max_episode_turns: int = field(default=50, metadata={"help": "commands per episode before it is cut off"})
    seed: int = field(default=0, metadata={"help": "seed of the random agent and of the model's sampling"})
    output_dir: str | None = field(
        default=None,
        metadata={"help": f"folder for {REPORT_FILE} and the {TRANSCRIPTS_DIR}/ dataset; none: print only"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": f"replace {REPORT_FILE} and {TRANSCRIPTS_DIR}/ in --output_dir even when no textworld-rl "
                          "run wrote them"},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub dataset repo id (name or owner/name) to upload the transcripts to; needs --output_dir"},
    )
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "model agent: Hub id, model folder, training output folder (played with the prompt and "
                          "scoring settings of its training_args.json), or .gguf file"},
    )
    dtype: str = field(default="float32", metadata={"help": f"model weights dtype: {', '.join(DTYPES)}"})
    device: str = field(
        default="auto", metadata={"help": "model device: auto (cuda when available, else cpu), cpu, cuda, cuda:N"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the Hub repo to run"})
    action_mode: str = field(
        default="score",
        metadata={"help": "model agent: score (choose among the admissible commands) or generate (write a command)"},
    )
    max_candidates: int = field(
        default=ScoringConfig.max_candidates,
        metadata={"help": "score mode: admissible commands scored per turn at most (examine/look/inventory go first)"},
    )
    length_normalize: bool = field(
        default=ScoringConfig.length_normalize,
        metadata={"help": "score mode: a command's score is the mean of its tokens' log-probs instead of the sum"},
    )
    least_tried: bool = field(
        default=ScoringConfig.least_tried,
        metadata={"help": "score mode and the random agent: choose among the commands the episode played least often "
                          "at the same place (untried first)"},
    )
    do_sample: bool = field(
        default=False, metadata={"help": "sample commands (score mode: from the candidates' softmax) instead of greedy"}
    )
    temperature: float = field(default=GenerationConfig.temperature, metadata={"help": "sampling temperature"})
    top_k: int = field(default=GenerationConfig.top_k, metadata={"help": "sample from the k likeliest tokens (0: all)"})
    top_p: float = field(default=GenerationConfig.top_p, metadata={"help": "nucleus sampling mass (1: off)"})
    max_new_tokens: int = field(
        default=GenerationConfig.max_new_tokens, metadata={"help": "tokens per command at most"}
    )
    prompt_format: str = field(
        default=PromptConfig.format, metadata={"help": f"prompt format: {', '.join(PROMPT_FORMATS)}"}
    )
    memory_turns: int = field(default=PromptConfig.memory_turns, metadata={"help": "past turns shown in the prompt"})
    hint: bool = field(default=PromptConfig.hint, metadata={"help": "list the admissible commands in the prompt"})
    hint_examine: bool = field(
        default=PromptConfig.hint_examine, metadata={"help": "keep examine/look/inventory in the listed commands"}
    )
    num_examples: int = field(default=PromptConfig.num_examples, metadata={"help": "example turns in the prompt"})
    max_prompt_tokens: int = field(
        default=PromptConfig.max_prompt_tokens, metadata={"help": "prompt length cap in tokens"}
    )
    mark_tried: bool = field(
        default=PromptConfig.mark_tried,
        metadata={"help": "say in the prompt which commands the episode already played from the same observation"},
    )
    context: str = field(
        default=RolloutArguments.context,
        metadata={"help": f"what the model reads each turn: {' or '.join(CONTEXTS)} (a prompt per turn, or the "
                          "episode's conversation as one token stream with a KV cache)"},
    )
    max_context_tokens: int = field(
        default=RolloutArguments.max_context_tokens,
        metadata={"help": "episode context: a stream restarts from the window prompt rather than grow past this"},
    )
    games_dir: str = field(
        default_factory=lambda: str(default_cache_dir()),
        metadata={"help": "cache of generated games (default: $TEXTWORLD_RL_GAMES or ./games)"},
    )


def parse_args(argv: list[str] | None = None) -> Args:
    """Args from flags, or from a YAML file given first and then flags that override it (as the trainers read
    theirs)."""
    return parse_arguments((Args,), sys.argv[1:] if argv is None else argv)[0]


def fields_given(argv: list[str]) -> set[str]:
    """The Args fields that argv sets, a YAML file's keys included, as the parser reads them: `--no_hint`,
    `--hint False`, `--memory-turns 1`, abbreviations and deprecated names count too."""
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = yaml_flags(argv[0]) + argv[1:]
    with contextlib.redirect_stderr(io.StringIO()):  # parse_arguments has warned of the deprecated names already
        argv = renamed_flags(argv)
    parser = HfArgumentParser(Args)
    for action in parser._actions:  # argparse has no public way to drop the defaults and types the fields declare
        # No default: only the fields argv sets reach the namespace. No type: parse_arguments has checked the values,
        # and reads some that the field's type would refuse (`none` for None).
        action.default, action.type = argparse.SUPPRESS, None
    return set(vars(parser.parse_known_args(argv)[0]))


def prompt_config(args: Args) -> PromptConfig:
    return PromptConfig(args.prompt_format, args.memory_turns, args.hint, args.hint_examine, args.num_examples,
                        args.max_prompt_tokens, args.mark_tried)


def generation_config(args: Args) -> GenerationConfig:
    return GenerationConfig(args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p)


def scoring_config(args: Args) -> ScoringConfig:
    return ScoringConfig(args.max_candidates, args.length_normalize, args.do_sample, args.temperature, args.least_tried)


def check_args(args: Args) -> None:
    """Every flag checked without loading a model or generating a game; raises ValueError naming the flag."""
    check_finite_numbers((args,))
    if args.agent not in AGENTS:
        raise ValueError(f"--agent {args.agent!r} is unknown; choose one of {', '.join(AGENTS)}")
    if args.split not in SPLITS:
        raise ValueError(f"--split {args.split!r} is unknown; choose one of {', '.join(SPLITS)}")
    for flag in ("num_envs", "max_episode_turns", "num_episodes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be at least 1, got {value}")
    try:
        check_game_source(args.games, args.games_dir)
    except GameError as error:
        raise ValueError(f"--games: {error}") from None
    if args.push_to_hub is not None:
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as error:
            raise ValueError(
                f"--push_to_hub {args.push_to_hub!r} is not a repo id ('name' or 'owner/name'): {error}"
            ) from None
        if args.output_dir is None:
            raise ValueError("--push_to_hub needs --output_dir: the transcripts are saved there first, so that a "
                             "failed upload loses nothing")
        check_push_flag(args.push_to_hub)
    check_play_settings(args)
    if args.agent == "model":
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype {args.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        if args.device != "auto":
            try:
                torch.device(args.device)
            except RuntimeError:
                raise ValueError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        try:
            resolve_model(args.model_name_or_path)
        except ModelError as error:
            raise ValueError(f"--model_name_or_path: {error}") from None
    check_no_negative_counts((args,))


def check_play_settings(args: Args) -> None:
    """The prompt, generation and scoring flags, the TRAINING_SETTINGS among them."""
    check_action_flags(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    check_context_flags(args)
    try:
        prompt_config(args)
        generation_config(args)
        scoring_config(args)
    except ValueError as error:
        raise ValueError(f"prompt/generation/scoring flags: {error}") from None


def read_training_settings(model_name_or_path: str) -> tuple[Path | None, dict]:
    """(training_args.json of the folder the model loads from, its TRAINING_SETTINGS), or (None, {}) for a model
    that no training run wrote (a Hub id, a plain model folder, a .gguf file)."""
    source, _ = resolve_model(model_name_or_path)
    path = Path(source) / ARGS_FILE
    if not path.is_file():
        return None, {}
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix it or delete it") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not an object of flag names and values")
    return path, {name: saved[name] for name in TRAINING_SETTINGS if name in saved}


def with_training_settings(args: Args, given: set[str]) -> tuple[Args, Path | None, dict[str, str]]:
    """The model agent's args with the TRAINING_SETTINGS that are not in `given` taken from its training run, the
    training_args.json read (None: none), and where each setting came from."""
    path, saved = read_training_settings(args.model_name_or_path) if args.agent == "model" else (None, {})
    taken = {name: value for name, value in saved.items() if name not in given}
    merged = replace(args, **taken)
    try:
        check_setting_types(taken)
        check_play_settings(merged)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    sources = {name: FROM_COMMAND_LINE if name in given else ARGS_FILE if name in taken else FROM_DEFAULT
               for name in TRAINING_SETTINGS}
    return merged, path, sources


def check_setting_types(settings: dict) -> None:
    """Values read from JSON skip the parser's type conversion: each must have its Args field's type (exactly, as a
    bool is also an int)."""
    defaults = {f.name: f.default for f in fields(Args)}
    for name, value in settings.items():
        expected = type(defaults[name])
        if type(value) is not expected:
            raise ValueError(f"{name} is {value!r}, not a {expected.__name__}")


def describe_settings(path: Path, args: Args, sources: dict[str, str]) -> str:
    """One line: the settings taken from `path` with their values, then the settings the flags gave."""
    taken = [f"{name}={getattr(args, name)}" for name, source in sources.items() if source == ARGS_FILE]
    flags = [name for name, source in sources.items() if source == FROM_COMMAND_LINE]
    line = f"settings from {path}: {', '.join(taken) or 'none'}"
    return f"{line} ({FROM_COMMAND_LINE}: {', '.join(flags)})" if flags else line


def check_play_paths(args: Args, given: set[str]) -> None:
    """The folders play.py writes, before anything is played: --output_dir (when given) and the games cache (the
    flag when `given`, else $TEXTWORLD_RL_GAMES or ./games). Raises ValueError naming the path."""
    if args.output_dir:
        check_writable_folder(Path(args.output_dir), f"--output_dir {args.output_dir}", "pass another --output_dir")
    check_games_dir(args.games_dir if "games_dir" in given else None, [(args.games, args.split)])


def claim_output_dir(args: Args) -> None:
    """--output_dir locked for this run (released by main), and refused when it holds a report or transcripts that
    no textworld-rl run wrote (unless --overwrite_output_dir)."""
    lock_output_dir(Path(args.output_dir))
    if not args.overwrite_output_dir:
        check_no_foreign_outputs(Path(args.output_dir), PLAY_OUTPUTS)


def load_play_tokenizer(args: Args, budget_file: Path | None):
    """The model agent's tokenizer (None for the other agents), and the prompt budget checked with it before the
    model loads; `budget_file`: the training_args.json that set --max_prompt_tokens (None: the flag or default)."""
    if args.agent != "model":
        return None
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    try:
        check_prompt_budget(prompt_config(args), tokenizer)
    except ValueError as error:
        raise ValueError(f"{budget_file}: {error}" if budget_file else str(error)) from None
    return tokenizer


def make_agent(args: Args, tokenizer):
    """The agent; loads the model for the model agent (`tokenizer`: its tokenizer)."""
    if args.agent == "random":
        return RandomAgent(args.seed, args.least_tried)
    if args.agent == "walkthrough":
        return WalkthroughAgent()
    if args.agent == "human":
        return HumanAgent(input_fn=input, print_fn=print)
    set_seed(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_model(args.model_name_or_path, args.dtype, device, args.trust_remote_code)
    fit_tokenizer_to_model(tokenizer, model)
    episode = args.context == "episode"
    if args.action_mode == "score":
        if episode:
            return EpisodeScoringAgent(model, tokenizer, prompt_config(args), scoring_config(args), args.max_context_tokens)
        return ScoringAgent(model, tokenizer, prompt_config(args), scoring_config(args))
    if episode:
        return EpisodeModelAgent(model, tokenizer, prompt_config(args), generation_config(args), args.max_context_tokens)
    return ModelAgent(model, tokenizer, generation_config(args))


def save_outputs(output_dir: str, report: dict, args: Args, settings_source: dict[str, str], dataset) -> None:
    """report.json and transcripts/, each written beside the target first and then renamed into place."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    record_outputs(folder, list(PLAY_OUTPUTS))
    staging = folder / f".{REPORT_FILE}.{os.getpid()}"
    record = {**report, "args": asdict(args), "settings_source": settings_source}
    staging.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(staging, folder / REPORT_FILE)
    staging, target = folder / f".{TRANSCRIPTS_DIR}.{os.getpid()}", folder / TRANSCRIPTS_DIR
    dataset.save_to_disk(str(staging))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def main(argv: list[str] | None = None) -> int:
    """play.py as a command (see `run`): SIGINT (Ctrl-C) and SIGTERM stop it cleanly. The episodes in flight are
    dropped, the finished ones reported and written, marked partial, and the exit code is 128 + the signal's number
    (130, 143)."""
    with stop_signals_raise():
        try:
            return run(sys.argv[1:] if argv is None else argv)
        except Stopped as stop:  # while loading, before any episode was played, or after the outputs were written
            print(f"stopped by {stop.signal_name}; nothing more was written", file=sys.stderr)
            return stop.exit_code


def run(argv: list[str]) -> int:
    """Parse and check the flags, play, print the table, write the outputs; returns the exit code (2: bad flags)."""
    try:
        return play_games(argv)
    finally:
        release_output_dirs()  # the lock play_games took on --output_dir


def play_games(argv: list[str]) -> int:
    """Check the flags and paths, lock --output_dir, play, report; 2 for bad input."""
    try:
        args = parse_args(argv)
        given = fields_given(argv)
        check_args(args)
        args, settings_file, settings_source = with_training_settings(args, given)
        check_play_paths(args, given)
        if args.output_dir:
            claim_output_dir(args)
        budget_file = settings_file if settings_source["max_prompt_tokens"] == ARGS_FILE else None
        tokenizer = load_play_tokenizer(args, budget_file)
        games = resolve_games(args.games, args.split, args.games_dir)
        agent = make_agent(args, tokenizer)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if settings_file is not None:
        print(describe_settings(settings_file, args, settings_source))

    num_episodes, stop = args.num_episodes or len(games), None
    try:
        result = evaluate(
            agent,
            games,
            num_episodes=num_episodes,
            num_envs=1 if args.agent == "human" else args.num_envs,
            max_episode_turns=args.max_episode_turns,
            prompt_config=prompt_config(args),
            tokenizer=tokenizer,
            seed=args.seed,
            progress=args.agent != "human",  # a progress bar would cut into the game text
        )
    except Stopped as stopped:
        if stopped.finished is None:  # stopped while the games started or closed: main reports it
            raise
        stop, result = stopped, stopped.finished
    except GameProcessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report = {**result.report, "partial": stop is not None}
    print(format_report_table(report))

    if args.output_dir:  # --push_to_hub implies it
        dataset = Dataset.from_list(result.transcripts)
        with stop_signals_held():  # written whole; a stop signal waits for it
            save_outputs(args.output_dir, report, args, settings_source, dataset)
            print(f"wrote {Path(args.output_dir) / REPORT_FILE} and {Path(args.output_dir) / TRANSCRIPTS_DIR}/")
    if stop is not None:
        kept = f"{args.output_dir} holds them, marked partial" if args.output_dir else "the table shows them"
        print(f"stopped by {stop.signal_name} after {report['episodes']} of {num_episodes} episodes ({kept}); run the "
              "same command again to play them all", file=sys.stderr)
        return stop.exit_code
    if args.push_to_hub:
        try:
            dataset.push_to_hub(args.push_to_hub)
        except Exception as error:  # noqa: BLE001 - network, auth, quota: the saved outputs can be pushed later
            print(f"error: {push_failure_message(args.output_dir, args.push_to_hub, error)}", file=sys.stderr)
            return 1
        print(f"pushed the transcripts to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
