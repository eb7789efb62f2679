"""What the training scripts share around their algorithm, on top of `accelerate`: the run flags every trainer has,
parsing and checking them before anything heavy loads, the policy and the frozen reference, the accelerator and the
game sets, resuming, held-out evaluation over all processes, the guarded optimizer step, the model card,
checkpoints (written whole or not at all), the final model and the closing summary. A script keeps its algorithm:
what it collects, how it turns that into a loss, and its own flags.

A script's life: `parse_or_exit` (flags, checks, the checkpoint to resume), `load_models_or_exit`, its own model
pieces, `training = TrainingRun(...)` (accelerator, games, trainer state), its optimizer, `training.prepare` /
`training.resume`, `training.evaluate_baselines`, then its loop with `training.evaluate_held_out`, `training.log`,
`training.save_checkpoint`, and `training.finish`; `main_or_exit(main)` runs it.

Layout of a script's output_dir: the final policy (save_pretrained, tokenizer, README.md model card, training_args.json)
at its root; checkpoints/checkpoint-N holding the same plus training_state/ (accelerator.save_state: weights,
optimizer, RNG states) and trainer_state.json (the step reached, counters, evaluations); rollouts/ (datasets, see
lib/rollout.py); runs/ (tracker logs); the run's lock and the marker of what textworld-rl wrote (lib/run_folder.py).
"""

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from lib.agents import RandomAgent
from lib.arguments import (
    DEPRECATED_FLAGS,
    TRACKERS,
    RolloutArguments,
    check_finite_numbers,
    check_no_negative_counts,
    check_push_to_hub,
    check_report_to,
    check_rollout_arguments,
    parse_arguments,
)
from lib.checkpoints import (
    CheckpointError,
    check_training_state,
    read_json_object,
    write_plain_deepspeed_checkpoints,
)
from lib.env import GameProcessError
from lib.evaluation import evaluate, merge_reports
from lib.games import GameError, check_game_source, resolve_games, stages
from lib.hub import check_push_flag, push_failure_message, push_model_folder
from lib.models import (
    CHECKPOINTS_DIR,
    DEFAULT_MODEL,
    DTYPES,
    ModelError,
    fit_tokenizer_to_model,
    freeze_lower_layers,
    load_model,
    load_tokenizer,
    newest_checkpoint,
    resolve_model,
    save_model,
)
from lib.prompts import PromptConfig, check_prompt_budget
from lib.rollout import ROLLOUTS_DIR
from lib.run_folder import (
    LOCK_FILE,
    MARKER_FILE,
    check_games_dir,
    check_no_foreign_outputs,
    check_writable_folder,
    games_cache_dir,
    is_launch_main_process,
    lock_output_dir,
    record_outputs,
    release_output_dirs,
)
from lib.stopping import Stopped, stop_signals_held, stop_signals_raise
from lib.value_head import PolicyWithValue, save_value_head

TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
ARGS_FILE = "training_args.json"
LOG_DIR = "runs"
# What a trainer writes at output_dir's top (name patterns): the final policy (save_pretrained: config, weights,
# tokenizer), its value head, arguments and model card. Such files that no textworld-rl run wrote are a user's.
TRAINING_OUTPUTS = (
    "README.md", ARGS_FILE, "config.json", "generation_config.json", "model*.safetensors",
    "model.safetensors.index.json", "value_head.safetensors", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
)
# Flags a resumed run must keep: they fix the model and its trainable parameters (the checkpoint's weights and
# optimizer state must fit them) and the games' state (which games, how many slots, where each stands). Others may
# change on resume (a resumed run equals the uninterrupted one only when none does).
RESUME_MUST_MATCH = frozenset({
    "model_name_or_path", "dtype", "trainable_layers_fraction", "value_head_type", "value_head_hidden_size",
    "detach_value_head", "advantage_estimator", "group_size", "action_mode", "train_games", "seed", "num_envs",
    "max_episode_turns", "train_max_episode_turns", "context", "value_learning_rate", "value_warmup_iterations",
})


@dataclass
class RunArguments:
    """The flags of every trainer; a script subclasses it for its own (and its output_dir default)."""

    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy: hub id, folder, training output, .gguf, or the packaged SmolLM2-135M."})
    output_dir: str = field(default="outputs/run", metadata={"help": "Where the final model, checkpoints, rollouts and logs go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete the checkpoints, rollouts and logs of an earlier run in output_dir first, and replace files there that no textworld-rl run wrote (README.md, config.json, ...)."})
    train_games: str = field(default="default", metadata={"help": "Training games: named set, generator spec (tw-coin_collector:level=2:n=4, twx-coin:numLocations=5:n=16, sciworld-boil), files, folders or globs; comma-joined for a mixture."})
    eval_games: str = field(default="default", metadata={"help": "Held-out games for evaluation (a named set or spec uses its eval split; a twx- or sciworld- spec's is the engine's dev fold, its test fold with :eval_fold=test, e.g. sciworld-boil:eval_fold=test)."})
    games_dir: str | None = field(default=None, metadata={"help": "Cache for generated games (default $TEXTWORLD_RL_GAMES or ./games)."})
    num_envs: int = field(default=8, metadata={"help": "Game slots played in parallel, in total over all processes (training and evaluation)."})
    max_episode_turns: int = field(default=12, metadata={"help": "Turns (commands) per episode before it is truncated (evaluation, and training unless --train_max_episode_turns)."})
    train_max_episode_turns: int | None = field(default=None, metadata={"help": "Turns per training episode before it is truncated (default: --max_episode_turns; evaluation keeps that): a shorter cap makes whole-episode iterations cheaper on long games."})
    seed: int = field(default=0, metadata={"help": "Random seed (torch, sampling, game order)."})
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    report_to: str = field(default="tensorboard", metadata={"help": f"Tracker: {', '.join(TRACKERS)}."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the final model and the rollout dataset to."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or `latest` (newest in output_dir)."})
    eval_episodes: int = field(default=12, metadata={"help": "Held-out episodes per evaluation (0: no evaluation)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many newest checkpoints (0: keep all)."})
    max_nonfinite_updates: int = field(default=3, metadata={"help": "Stop after this many updates in a row skipped for a NaN or inf (loss, gradient, rewards, advantages)."})
    trainable_layers_fraction: float = field(default=0.33, metadata={"help": "Train only this last fraction of decoder layers plus the final norm (and the LM head when not tied to the input embeddings); 1 trains all."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def training_episode_turns(self) -> int:
        """Turns a training episode may last (evaluation's episodes last max_episode_turns)."""
        return self.train_max_episode_turns or self.max_episode_turns


def check_run_arguments(run: RunArguments, world_size: int) -> None:
    """Raise ValueError naming the flag for a bad value of the shared flags; loads no model (game files are started
    once, lib.games.check_game_source, and a --push_to_hub repo is checked with the Hub)."""
    for name in ("num_envs", "max_episode_turns", "max_nonfinite_updates"):
        if not getattr(run, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(run, name)}")
    if run.train_max_episode_turns is not None and run.train_max_episode_turns < 1:
        raise ValueError(f"--train_max_episode_turns must be positive, got {run.train_max_episode_turns}; "
                         "drop it to train on episodes as long as --max_episode_turns")
    for name in ("eval_episodes", "save_total_limit"):
        if getattr(run, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(run, name)}")
    if not 0 < run.trainable_layers_fraction <= 1:
        raise ValueError(f"--trainable_layers_fraction must be in (0, 1], got {run.trainable_layers_fraction}")
    if run.dtype not in DTYPES:
        raise ValueError(f"--dtype {run.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    check_report_to(run.report_to)
    check_push_to_hub(run.push_to_hub)
    if run.push_to_hub is not None:
        check_push_flag(run.push_to_hub)
    try:
        resolve_model(run.model_name_or_path)
    except ModelError as error:
        raise ValueError(f"--model_name_or_path: {error}") from None
    for flag, source in (("--train_games", run.train_games), ("--eval_games", run.eval_games)):
        try:
            for stage in stages(source) if flag == "--train_games" else [source]:
                check_game_source(stage, run.games_dir)
        except GameError as error:
            raise ValueError(f"{flag}: {error}") from None


def parse_or_exit(argument_types: tuple, argv: list[str], check: Callable, step_key: str, last_step_flag: str):
    """Every flag parsed and checked, every folder the run writes checked, the output folder locked for this run
    (by the launch's main process) and the checkpoint to resume from found, before anything heavy is built; a bad one
    exits with one `error:` line. Launchers export WORLD_SIZE and RANK before starting the script.

    `argument_types`: the script's dataclasses, its RunArguments subclass first; `check(*groups, world_size)` raises
    ValueError for the script's own flags (check_run_arguments runs before it, check_rollout_arguments after); `step_key` is what the script counts
    (iteration, round) and `last_step_flag` the flag that ends it.
    Returns (groups, arguments: every flag as one flat dict, resume folder or None)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        groups = parse_arguments(argument_types, argv)
        check_finite_numbers(groups)
        check_run_arguments(groups[0], world_size)
        check(*groups, world_size)
        for group in groups:  # every trainer plays with the shared prompt, sampling and reward flags
            if isinstance(group, RolloutArguments):
                check_rollout_arguments(group)
        check_no_negative_counts(groups)
        check_run_paths(groups[0])
    except ValueError as error:
        sys.exit(f"error: {error}")
    run = groups[0]
    arguments = {key: value for group in groups for key, value in asdict(group).items()}
    try:
        if is_launch_main_process():
            lock_output_dir(Path(run.output_dir))  # before what follows reads the folder: another run may be writing it
        resume_folder = find_resume_checkpoint(
            run.resume_from_checkpoint, run.output_dir, step_key, getattr(run, last_step_flag), f"--{last_step_flag}",
            arguments, world_size,
        )
        check_output_dir(run.output_dir, resume_folder, run.overwrite_output_dir)
    except ValueError as error:
        release_output_dirs()
        sys.exit(f"error: {error}")
    return groups, arguments, resume_folder


def check_run_paths(run: RunArguments) -> None:
    """Every folder the run writes, checked before anything is created or loaded: output_dir, its checkpoints,
    rollouts and tracker log folders, and the games cache. Raises ValueError naming the path."""
    output = Path(run.output_dir)
    check_writable_folder(output, f"--output_dir {output}", "pass another --output_dir")
    written = [(CHECKPOINTS_DIR, "checkpoints"), (ROLLOUTS_DIR, "rollouts")]
    if run.report_to != "none":
        written.append((LOG_DIR, "tracker logs"))
    for name, what in written:
        check_writable_folder(output / name, f"{output / name} (the {what} of --output_dir)",
                              "pass another --output_dir")
    sources = [(stage, "train") for stage in stages(run.train_games)]
    sources += [(run.eval_games, "eval")] if run.eval_episodes else []
    check_games_dir(run.games_dir, sources)


def load_models_or_exit(run: RunArguments, prompts: PromptConfig, with_reference: bool):
    """(tokenizer, policy on the CPU with only its last --trainable_layers_fraction trainable, the reference or
    None): seeded first, so that what the script builds next starts the same each run. The prompt budget is checked
    with the tokenizer, before the (much slower) model loads; the reference (`frozen_copy` of the starting policy)
    is made here, before the TrainingRun, as it must be."""
    set_seed(run.seed)
    try:
        tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
        check_prompt_budget(prompts, tokenizer)
        policy = load_model(run.model_name_or_path, run.dtype, "cpu", run.trust_remote_code)
        fit_tokenizer_to_model(tokenizer, policy)
    except ValueError as error:  # lib.models.ModelError, or a budget too small
        sys.exit(f"error: {error}")
    reference = frozen_copy(policy) if with_reference else None
    freeze_lower_layers(policy, run.trainable_layers_fraction)
    return tokenizer, policy, reference


def frozen_copy(model):
    """The reference: a frozen copy of the starting policy. Make it before the TrainingRun: once a ZeRO-3 launch has
    set up DeepSpeed, a copy's weights end up emptied with the policy's."""
    return copy.deepcopy(model).eval().requires_grad_(False)


# The run that main_or_exit reports on when a stop signal ends the script (TrainingRun sets it).
_current_run = None


def main_or_exit(main: Callable[[list[str]], None]) -> None:
    """A script's `__main__`: run main(sys.argv[1:]). A diverged run or a game that cannot be played ends with one
    `error:` line, not a traceback; so does SIGINT (Ctrl-C) or SIGTERM, on every process of a launch: the step in
    flight is dropped, the checkpoints and rollouts written so far stay (each is written whole), the game processes
    end with the interpreter (daemonic children), and the exit code is 128 + the signal's number (130, 143)."""
    global _current_run
    _current_run = None  # a run of this call's own, once TrainingRun sets it
    with stop_signals_raise():
        try:
            main(sys.argv[1:])
        except Stopped as stop:
            line = f"stopped by {stop.signal_name} before the run started; it wrote nothing"
            if _current_run is not None:
                line = _current_run.stop_line(stop.signal_name)
            if line:
                print(line, file=sys.stderr)
            sys.exit(stop.exit_code)
        except (NonFiniteError, GameProcessError) as error:  # the checkpoints written so far stay as they are
            sys.exit(f"error: {error}")


def saved_so_far(output_dir: Path) -> str:
    """What a stopped run keeps in output_dir and how to go on from it."""
    newest = newest_checkpoint(output_dir)
    if newest is None:
        return "no checkpoint was saved: start again with --overwrite_output_dir"
    return f"nothing was saved after {newest.name}: resume from it with --resume_from_checkpoint latest"


# What a run did before these flags existed (PPO's value-head GAE, slots playing alone, training episodes as long as
# evaluation's).
FLAG_DEFAULTS_BEFORE_THEY_EXISTED = {"advantage_estimator": "gae", "group_size": 1, "context": "window",
                                     "value_learning_rate": None, "value_warmup_iterations": 0,
                                     "train_max_episode_turns": None}


def machine_description() -> str:
    """`CPU model, N cores, GPU name xK` (or `no GPU`): the machine column of results and benchmark tables."""
    import platform

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}"


def build_accelerator(gradient_accumulation_steps: int, report_to: str, output_dir: str) -> Accelerator:
    """The Accelerator of a training script, launched or not, on CPUs or GPUs."""
    # Launched processes (LOCAL_RANK set) on a CPU-only machine talk over gloo: accelerate would pick a backend
    # that fails there. A plain `python` run must get no backend at all, or accelerate expects a process group.
    launched_on_cpu = "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_dir=output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched_on_cpu else [],
    )
    # The launcher may export its own accumulation setting; the flag is the single source of truth.
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps
    return accelerator


def shared_games(train: list[str], held_out: list[str]) -> list[str]:
    """The eval games that are training games too (the same file, however its path is written)."""
    trained = {os.path.realpath(game) for game in train}
    return [game for game in held_out if os.path.realpath(game) in trained]


def resolve_game_sets(accelerator, train_games: str, eval_games: str, games_dir: Path, evaluate_too: bool,
                      progress: bool) -> tuple[list[list[str]], list[str]]:
    """The training games of each curriculum stage (one stage without `>`) and the eval games; the main process
    generates missing games first, the others then find them cached. Raises lib.games.GameError for a bad source,
    ValueError when a process would get no training game."""
    progress = progress and accelerator.is_main_process
    with accelerator.main_process_first():
        train = [resolve_games(stage, "train", games_dir, progress=progress) for stage in stages(train_games)]
        held_out = resolve_games(eval_games, "eval", games_dir, progress=progress) if evaluate_too else []
    for number, games in enumerate(train, start=1):
        if len(games) < accelerator.num_processes:
            where = f"stage {number} of --train_games" if len(train) > 1 else "--train_games"
            raise ValueError(
                f"{where} has {len(games)} games for {accelerator.num_processes} processes; every process needs one"
            )
    return train, held_out


def build_optimizer(accelerator, parameters: list, learning_rate: float, micro_batch_size: int,
                    gradient_accumulation_steps: int, max_grad_norm: float) -> torch.optim.Optimizer:
    """AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload (which refuses a torch optimizer: the step runs where the
    states live), over `parameters`: tensors, or parameter groups (dicts with their own "lr"; DeepSpeed's ZeRO keeps
    the groups of an optimizer it is given, and their rates); `learning_rate` for groups without one. Under DeepSpeed
    also sets the batch sizes it would read from a DataLoader we do not have, and its
    gradient clipping (DeepSpeed clips by itself)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return torch.optim.AdamW(parameters, lr=learning_rate)
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
    if plugin.offload_optimizer_device in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(parameters, lr=learning_rate, adamw_mode=True)
    return torch.optim.AdamW(parameters, lr=learning_rate)


class NonFiniteError(RuntimeError):
    """Too many updates in a row had a NaN or inf."""


class NonFiniteGuard:
    """Skips updates that meet a NaN or inf, the same decision on every process, and stops the run after `limit`
    skipped updates in a row (raising NonFiniteError): a diverged run is stopped before it checkpoints garbage.

    Per optimizer step: `finite_loss(loss)` before each micro-batch's backward (a False answer: skip that backward),
    then `step(optimizer, grad_norm, where)` at the gradient-sync boundary instead of optimizer.step().
    Per batch: `finite_batch(tensors, where)` before the update (a False answer: skip the whole update).
    """

    def __init__(self, accelerator, limit: int, output_dir: Path | None = None):
        self.accelerator = accelerator
        self.limit = limit
        self.output_dir = output_dir  # where the run's checkpoints go, named when a weight turns non-finite
        self.streak = 0  # skipped updates in a row
        self.skipped = 0  # in all
        self._poisoned = False  # a micro-batch of the current optimizer step had a non-finite loss

    def _everywhere(self, finite: bool) -> bool:
        flags = torch.tensor([0.0 if finite else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(flags, "sum")) == 0.0

    def finite_batch(self, tensors: list[torch.Tensor], where: str) -> bool:
        finite = self._everywhere(all(bool(torch.isfinite(t).all()) for t in tensors))
        if not finite:
            self._skip(f"NaN or inf in the rewards, values or advantages of {where}: update skipped")
        return finite

    def finite_loss(self, loss: torch.Tensor) -> bool:
        finite = self._everywhere(bool(torch.isfinite(loss.detach()).all()))
        self._poisoned |= not finite
        return finite

    def step(self, optimizer, grad_norm, where: str, parameters: list[torch.Tensor]) -> bool:
        """Step the optimizer unless a loss of this step or the gradient norm was NaN or inf; True when it stepped.
        A step that leaves a NaN or inf in the trainable `parameters` stops the run (NonFiniteError) before anything
        saves them."""
        finite = not self._poisoned and (grad_norm is None or math.isfinite(float(grad_norm)))
        self._poisoned = False
        if finite:
            self.streak = 0
            optimizer.step()
            self._check_weights(optimizer, parameters, where)
        else:
            self._skip(f"NaN or inf in the loss or gradient at {where}: optimizer step skipped")
        optimizer.zero_grad()
        return finite

    def _check_weights(self, optimizer, parameters: list[torch.Tensor], where: str) -> None:
        # Finite gradients can still step into inf (an overflowing learning rate, a bad optimizer state); every
        # later loss would then be NaN and the run would skip its way to a stop, or checkpoint the broken weights.
        finite = bool(torch.stack([torch.isfinite(p).all() for p in parameters]).all()) if parameters else True
        if not self._everywhere(finite):
            saved = f"; {saved_so_far(self.output_dir)}" if self.output_dir is not None else ""
            raise NonFiniteError(
                f"a non-finite weight after the optimizer step at {where}: stopped without saving it. Lower "
                f"--learning_rate (now {optimizer.param_groups[0]['lr']:g}) or --max_grad_norm{saved}"
            )

    def _skip(self, message: str) -> None:
        self.streak += 1
        self.skipped += 1
        self.accelerator.print(f"warning: {message} ({self.streak} in a row)")
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"{self.streak} updates in a row met a NaN or inf ({message}); stopped before saving. Lower "
                "--learning_rate or --max_grad_norm, check the reward chain, and resume from the last checkpoint "
                "with --resume_from_checkpoint latest"
            )


def backward_and_step(accelerator, guard: NonFiniteGuard, loss: torch.Tensor, optimizer, parameters: list,
                      max_grad_norm: float, where: str) -> tuple[bool, bool, float | None]:
    """One micro-batch's backward (skipped for a NaN or inf loss) and, at the gradient-sync boundary, the clipped
    optimizer step (skipped for a NaN or inf loss of this step or gradient norm); call it inside
    `accelerator.accumulate(model)`. Returns (finite loss, stepped, grad norm or None)."""
    finite = guard.finite_loss(loss)
    if finite:
        accelerator.backward(loss)
    stepped, grad_norm = False, None
    if accelerator.sync_gradients:
        grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm)
        stepped = guard.step(optimizer, grad_norm, where, parameters)
    return finite, stepped, None if grad_norm is None else float(grad_norm)


def find_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str, step_key: str, last_step: int,
                           last_step_flag: str, arguments: dict, world_size: int) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names (`latest`: the newest in output_dir), or None.

    Its trainer_state.json must hold `step_key` (the script's step: iteration, round) below `last_step`, the value of
    `last_step_flag`; it must come from a run with the same values of the RESUME_MUST_MATCH flags (`arguments`) and
    the same number of processes; and the files a resume reads must be whole and load safely
    (check_checkpoint_files). Raises ValueError naming the flag or the file otherwise.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        folder = newest_checkpoint(output_dir)
        if folder is None:
            raise ValueError(f"--resume_from_checkpoint latest: no checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}; "
                             "drop the flag to start a fresh run")
    else:
        folder = Path(resume_from_checkpoint)
    if not (folder / TRAINING_STATE_DIR).is_dir() or not (folder / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {folder}: not a training checkpoint (no {TRAINING_STATE_DIR}/); "
                         f"pass a {CHECKPOINTS_DIR}/checkpoint-N folder or `latest`")
    state = read_checkpoint_json(folder, TRAINER_STATE_FILE)
    saved = read_checkpoint_json(folder, ARGS_FILE) if (folder / ARGS_FILE).exists() else {}
    if step_key not in state:
        raise ValueError(f"--resume_from_checkpoint {folder}: written by another script (no {step_key!r} in {TRAINER_STATE_FILE})")
    if state[step_key] >= last_step:
        raise ValueError(f"{last_step_flag} {last_step}: {folder} already finished {step_key} {state[step_key]}; raise it to continue")
    # Checkpoints written before a flag was renamed, or before it existed, ran with its old name or its default.
    saved = {DEPRECATED_FLAGS.get(key, key): value for key, value in saved.items()}
    if saved:
        saved = {**FLAG_DEFAULTS_BEFORE_THEY_EXISTED, **saved}
    changed = [key for key in arguments if key in RESUME_MUST_MATCH and key in saved and saved[key] != arguments[key]]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {folder} was written with "
            + ", ".join(f"--{key} {saved[key]}" for key in changed) + "; this run has "
            + ", ".join(f"--{key} {arguments[key]}" for key in changed)
            + ": resume with the interrupted run's values of these flags (they fix the model and the games' state)"
        )
    if state.get("num_processes", world_size) != world_size:
        raise ValueError(f"--resume_from_checkpoint {folder} was written by {state['num_processes']} processes, this "
                         f"launch has {world_size}: resume with the same number of processes")
    check_checkpoint_files(folder, world_size)
    return folder


def refused_checkpoint(folder: Path, error: CheckpointError) -> ValueError:
    return ValueError(f"--resume_from_checkpoint {folder}: {error}; resume from another checkpoint")


def read_checkpoint_json(folder: Path, name: str) -> dict:
    try:
        return read_json_object(folder / name)
    except CheckpointError as error:
        raise refused_checkpoint(folder, error) from None


def check_checkpoint_files(folder: Path, world_size: int) -> None:
    """The rest of what a resume reads: a process_state-P.json for each process when the script writes them, and a
    complete training_state/ whose every file loads safely (lib.checkpoints); ValueError naming the file otherwise."""
    try:
        if any(folder.glob("process_state-*.json")):  # a script that writes them needs every process's
            for rank in range(world_size):
                read_json_object(process_state_file(folder, rank))
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch
        check_training_state(folder / TRAINING_STATE_DIR, world_size, deepspeed)
    except CheckpointError as error:
        raise refused_checkpoint(folder, error) from None


def process_state_file(folder: Path, rank: int) -> Path:
    return folder / f"process_state-{rank}.json"


def load_process_state(folder: Path, rank: int) -> dict:
    """What save_checkpoint wrote for this process (its environments and histories), as data (checked readable by
    check_checkpoint_files)."""
    return read_json_object(process_state_file(folder, rank))


def check_output_dir(output_dir: str, resume_folder: Path | None, overwrite_output_dir: bool) -> None:
    """A fresh run must not mix its rollouts and checkpoints with an earlier run's, nor overwrite files that no
    textworld-rl run wrote; resuming from a checkpoint inside output_dir continues a run of ours there."""
    output = Path(output_dir)
    earlier = [output / CHECKPOINTS_DIR, output / ROLLOUTS_DIR]
    if resume_folder is None and any(path.exists() for path in earlier) and not overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output} holds an earlier run: pass --resume_from_checkpoint latest to continue it, "
            "--overwrite_output_dir to replace it, or another --output_dir"
        )
    resuming_here = resume_folder is not None and output.resolve() in resume_folder.resolve().parents
    if not (overwrite_output_dir or resuming_here):
        check_no_foreign_outputs(output, TRAINING_OUTPUTS)


def prepare_reference(ref_model, accelerator):
    """The frozen reference on the right device; under ZeRO-3 an inference-only DeepSpeed engine (as trl does), so
    its weights are sharded like the policy's. Returns what to call: the module, or the engine under ZeRO-3."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return ref_model.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    hidden = ref_model.config.hidden_size
    config["zero_optimization"].update({
        "reduce_bucket_size": hidden * hidden,
        "stage3_param_persistence_threshold": 10 * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
    })
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    return engine


@contextlib.contextmanager
def gathered_for_evaluation(model, zero3: bool):
    """Under ZeRO-3 every process gathers the full weights for the evaluation and generates without collectives:
    evaluation ends episodes at different times on each process, so their generate calls do not pair up."""
    if not zero3:
        yield
        return
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    with unwrap_model_for_generation(model):
        yield


def run_evaluation(accelerator, agent, games: list[str], num_episodes: int, num_envs: int, max_episode_turns: int,
                   prompt_config: PromptConfig, tokenizer, seed: int) -> dict | None:
    """Each process plays its share of the eval games (num_envs slots in total); the reports are merged over
    processes. None when num_episodes is 0."""
    if num_episodes == 0:
        return None
    result = evaluate(
        agent, games, num_episodes, max(1, num_envs // accelerator.num_processes), max_episode_turns,
        prompt_config, tokenizer=tokenizer, seed=seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, progress=False,
    )
    return merge_reports(gather_object([result.report]))


def eval_metrics(report: dict | None) -> dict:
    if not report:
        return {}
    return {f"eval/{key}": report[key] for key in ("normalized_score", "win_rate", "invalid_rate", "mean_steps")}


def describe(report: dict | None) -> str:
    if not report:
        return "not evaluated"
    crashed = f" ({report['crashed']} crashed episodes left out)" if report.get("crashed") else ""
    return (f"normalized score {report['normalized_score']:.3f}, win rate {report['win_rate']:.3f}, invalid rate "
            f"{report['invalid_rate']:.3f}{crashed}")


def evaluation_table(evals: dict) -> list[str]:
    """Markdown table lines for a model card: one row per named evaluation report (None: not evaluated, left out)."""
    lines = [
        "| agent | normalized score | win rate | invalid rate | mean steps | episodes |",
        "|---|---|---|---|---|---|",
    ]
    for name, report in evals.items():
        if report:
            lines.append(
                f"| {name} | {report['normalized_score']:.3f} | {report['win_rate']:.3f} | {report['invalid_rate']:.3f} "
                f"| {report['mean_steps']:.1f} | {report['episodes']} |"
            )
    return lines


def export_model(accelerator, model, tokenizer, folder: Path, state_dict: dict, card: str, arguments: dict) -> None:
    """Policy (save_pretrained) and, for a PolicyWithValue with a value head, its value head file; tokenizer, args and model card into
    folder (main process only)."""
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, PolicyWithValue):
        policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        save_model(unwrapped.policy, tokenizer, folder, state_dict=policy_state)
        if unwrapped.value_head is not None:
            head_state = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
            save_value_head(unwrapped.value_head, folder, head_state)
    else:
        save_model(unwrapped, tokenizer, folder, state_dict=state_dict)
    (folder / ARGS_FILE).write_text(json.dumps(arguments, indent=2))
    (folder / "README.md").write_text(card)


@stop_signals_held()  # a stop signal waits until the checkpoint is whole (and the old ones pruned)
def save_checkpoint(accelerator, model, tokenizer, output_dir: Path, step: int, trainer_state: dict,
                    card: str, arguments: dict, keep: int, process_state: dict | None = None) -> Path:
    """checkpoints/checkpoint-STEP written under a temporary name and renamed, so a crash leaves no half checkpoint;
    only the `keep` newest stay (0: all). `process_state`: this process's own JSON-ready state (its games, ...),
    written as process_state-RANK.json."""
    folder = output_dir / CHECKPOINTS_DIR / f"checkpoint-{step}"
    temporary = folder.parent / f".tmp-{folder.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards: every process must call it
    accelerator.save_state(str(temporary / TRAINING_STATE_DIR))
    if process_state is not None:
        process_state_file(temporary, accelerator.process_index).write_text(json.dumps(process_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_model(accelerator, model, tokenizer, temporary, state_dict, card, arguments)
        (temporary / TRAINER_STATE_FILE).write_text(
            json.dumps({**trainer_state, "num_processes": accelerator.num_processes}, indent=2)
        )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)
        if keep:
            older = sorted(
                (int(p.name.split("-")[-1]), p) for p in folder.parent.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            )
            for _, path in older[:-keep]:
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return folder


@stop_signals_held()  # a stop signal waits until every file is in place
def save_final_model(accelerator, model, tokenizer, output_dir: Path, card: str, arguments: dict) -> None:
    """The final policy at output_dir's root, each file moved into place only once all are written."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        temporary = output_dir / ".tmp-final"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        export_model(accelerator, model, tokenizer, temporary, state_dict, card, arguments)
        record_outputs(output_dir, [path.name for path in temporary.iterdir()])
        for path in temporary.iterdir():
            os.replace(path, output_dir / path.name)
        temporary.rmdir()
    accelerator.wait_for_everyone()


# What a push leaves out of output_dir: the model repo gets the final model only (the rollouts go as a dataset).
NOT_PUSHED = [f"{CHECKPOINTS_DIR}/*", f"{ROLLOUTS_DIR}/*", f"{LOG_DIR}/*", ".tmp-*", LOCK_FILE, MARKER_FILE]


def push_to_hub(repo_id: str, output_dir: Path, dataset) -> None:
    """The final model (output_dir without checkpoints, rollouts and logs) to the model repo `repo_id`, and `dataset`
    to the dataset repo of the same name (main process only)."""
    push_model_folder(repo_id, output_dir, NOT_PUSHED, dataset)


def model_card(run: RunArguments, *, title: str, tags: list[str], description: str, evals: dict, action_mode: str,
               held_out: bool) -> str:
    """README.md of a saved model: what trained it, its evaluation (`held_out`: on games it never trained on), and
    how to play it (play.py reads the prompt and scoring settings from training_args.json beside it; the action mode
    is spelled out for a copy played from the Hub, where play.py reads no training_args.json)."""
    play = f"python play.py --agent model --model_name_or_path {run.output_dir} --action_mode {action_mode}"
    evaluation = (f"Held-out evaluation on `{run.eval_games}` (eval split, greedy):" if held_out else
                  f"Evaluation on `{run.eval_games}` (greedy), not held out: some of its games are training games:")
    return "\n".join([
        "---", "library_name: transformers", f"tags: [textworld, {', '.join(tags)}]", "---", "",
        f"# {title}", "", description, "",
        evaluation, "",
        *evaluation_table(evals),
        "", "```bash", play, "```", "",
    ])


EVAL_LABELS = {"random": "random-admissible", "before": "before training", "after": "after training"}


class RunningMeans:
    """Sums of named figures over micro-batches (or optimizer steps), read back as means; NaN for a figure never
    added (every micro-batch skipped)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, figures: dict) -> None:
        for key, value in figures.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def mean(self, key: str) -> float:
        return self.sums[key] / self.counts[key] if self.counts.get(key) else math.nan


class TrainingRun:
    """One run of a training script around its algorithm: the accelerator, the game sets, the output folder, the
    trainer state (trainer_state.json: the step reached, counters, evaluations) and what the script does with them:
    prepare and resume, evaluate on held-out games, log, guard the optimizer step, checkpoint, finish.

    Built after the script's models (see frozen_copy) and before its optimizer. Each process samples differently
    from here on, the same way on every rerun.
    """

    def __init__(self, run: RunArguments, arguments: dict, resume_folder: Path | None, step_key: str,
                 gradient_accumulation_steps: int, started: float):
        import datasets

        self.run, self.arguments, self.resume_folder, self.step_key = run, arguments, resume_folder, step_key
        self.started = started  # when the script started work (model loading included), for wall_time_s
        self.accelerator = build_accelerator(gradient_accumulation_steps, run.report_to, run.output_dir)
        self.process_index, self.num_processes = self.accelerator.process_index, self.accelerator.num_processes
        self.output_dir = Path(run.output_dir)
        set_seed(run.seed, device_specific=True)
        datasets.disable_progress_bars()  # one bar per iteration is enough
        try:
            games_dir, _ = games_cache_dir(run.games_dir)
            self.train_stages, self.eval_games = resolve_game_sets(
                self.accelerator, run.train_games, run.eval_games, games_dir, run.eval_episodes > 0, run.progress
            )
        except (GameError, ValueError) as error:
            sys.exit(f"error: {error}")
        self.train_games = self.train_stages[0]  # a curriculum's first stage (ppo_textworld.py moves on)
        every_stage = [game for games in self.train_stages for game in games]
        self.eval_games_trained_on = len(shared_games(every_stage, self.eval_games))
        if self.eval_games_trained_on:
            self.accelerator.print(
                f"warning: {self.eval_games_trained_on} of the {len(self.eval_games)} --eval_games are --train_games "
                "too: the evaluation is not held out; pass game sources that share no game (a named set or "
                "generator spec uses its eval split)"
            )
        if run.overwrite_output_dir and self.accelerator.is_main_process:
            for name in (CHECKPOINTS_DIR, ROLLOUTS_DIR, LOG_DIR):
                shutil.rmtree(self.output_dir / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        plugin = self.accelerator.state.deepspeed_plugin
        self.zero3 = plugin is not None and plugin.zero_stage == 3
        # eval_history: one summary per held-out evaluation (learning curves); wall_time_s: summed over resumed runs.
        self.state = {step_key: 0, "env_steps": 0, "episodes": 0, "wall_time_s": 0.0, "evals": {}, "eval_history": [],
                      "eval_held_out": self.held_out}
        self.wall_time_before = 0.0
        self.guard = NonFiniteGuard(self.accelerator, run.max_nonfinite_updates, self.output_dir)
        self.step_in_progress: int | None = None  # set by the progress bar's loop
        global _current_run
        _current_run = self

    @property
    def held_out(self) -> bool:
        """Whether the eval games share no game with the training games."""
        return self.eval_games_trained_on == 0

    @property
    def evals(self) -> dict:
        """Named held-out reports (random, before, after, ...) for the model card and the closing summary."""
        return self.state["evals"]

    def prepare(self, model, optimizer, ref_model=None):
        """(model, optimizer, reference) ready for the launch's devices and DeepSpeed config; the model in eval mode
        (dropout, if any, only while updating)."""
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.accelerator.state.deepspeed_plugin is not None:  # its own checkpoint files would need a full unpickler
            write_plain_deepspeed_checkpoints(model)
        model.eval()
        return model, optimizer, None if ref_model is None else prepare_reference(ref_model, self.accelerator)

    def resume(self, optimizer) -> int:
        """Load the checkpoint to resume from (weights, optimizer, RNG states, trainer state), start the trackers;
        returns the first step to run. Each parameter group keeps the learning rate the script built it with."""
        if self.resume_folder is not None:
            # The learning rate flags may change on resume; the saved optimizer state holds the old rates.
            learning_rates = [group["lr"] for group in optimizer.param_groups]
            self.accelerator.load_state(str(self.resume_folder / TRAINING_STATE_DIR))
            for group, learning_rate in zip(optimizer.param_groups, learning_rates):
                group["lr"] = learning_rate
            self.state = read_json_object(self.resume_folder / TRAINER_STATE_FILE)
            self.state["eval_held_out"] = self.held_out  # --eval_games may change on resume
            self.wall_time_before = self.state["wall_time_s"]
            self.accelerator.print(f"resumed from {self.resume_folder} at {self.step_key} {self.state[self.step_key]}")
        if self.run.report_to != "none":
            config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.arguments.items()}
            self.accelerator.init_trackers(LOG_DIR, config=config)
        return self.state[self.step_key] + 1

    def load_process_state(self) -> dict:
        """What the checkpoint resumed from holds for this process (its games, ...), as save_checkpoint wrote it."""
        return load_process_state(self.resume_folder, self.process_index)

    def evaluate(self, agent, model, prompt_config: PromptConfig, tokenizer) -> dict | None:
        """`agent` plays the held-out games (every process its share, merged); None without --eval_episodes."""
        with gathered_for_evaluation(model, self.zero3), self.accelerator.autocast():
            return run_evaluation(
                self.accelerator, agent, self.eval_games, self.run.eval_episodes, self.run.num_envs,
                self.run.max_episode_turns, prompt_config, tokenizer, self.run.seed,
            )

    def evaluate_baselines(self, agent, model, prompt_config: PromptConfig, tokenizer) -> None:
        """Once per run (not again on resume): the random-admissible agent and the untrained policy (`agent`, greedy)
        on the held-out games, the second logged at step 0."""
        if "random" in self.evals:
            return
        self.evals["random"] = run_evaluation(  # no weights to gather for it under ZeRO-3
            self.accelerator, RandomAgent(self.run.seed), self.eval_games, self.run.eval_episodes, self.run.num_envs,
            self.run.max_episode_turns, prompt_config, tokenizer, self.run.seed,
        )
        self.log(self.evaluate_held_out(agent, model, prompt_config, tokenizer, "before"), step=0)
        self.accelerator.print(f"before training: {describe(self.evals['before'])} "
                               f"(random-admissible: {describe(self.evals['random'])})")

    def progress_bar(self, first_step: int, last_step: int, description: str):
        """tqdm over the steps first_step..last_step (a resumed run starts it part-way), on the main process only.
        Each step it hands out is the step in progress, which a stop signal's line names."""
        def steps():
            for step in range(first_step, last_step + 1):
                self.step_in_progress = step
                yield step

        return tqdm(steps(), desc=description, initial=first_step - 1, total=last_step,
                    disable=not (self.run.progress and self.accelerator.is_main_process))

    def stop_line(self, signal_name: str) -> str | None:
        """What main_or_exit prints when a stop signal ends the run: where it stopped, what it keeps, how to go on
        (None on the processes other than the main one, which says it for all)."""
        if not self.accelerator.is_main_process:
            return None
        if self.step_in_progress is None:
            where = f"before {self.step_key} {self.state[self.step_key] + 1}"
        else:
            where = f"at {self.step_key} {self.step_in_progress}"
        return f"stopped by {signal_name} {where}; {saved_so_far(self.output_dir)}"

    def evaluate_held_out(self, agent, model, prompt_config: PromptConfig, tokenizer, name: str | None = None) -> dict:
        """A timed evaluation of the policy, added to the learning curve (and to `evals` under `name`); returns its
        eval/ and perf/eval_s metrics."""
        started = time.time()
        report = self.evaluate(agent, model, prompt_config, tokenizer)
        if name is not None:
            self.evals[name] = report
        if report:
            self.state["eval_history"].append({
                self.step_key: self.state[self.step_key], "env_steps": self.state["env_steps"],
                **{key: report[key] for key in ("normalized_score", "win_rate", "invalid_rate", "mean_steps")},
            })
        return {**eval_metrics(report), "perf/eval_s": time.time() - started}

    def reduce(self, metrics: dict[str, float], reduction: str = "mean") -> dict[str, float]:
        """The same named figures over all processes (mean or sum), matched by name."""
        names = sorted(metrics)
        values = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=self.accelerator.device)
        return dict(zip(names, self.accelerator.reduce(values, reduction).tolist()))

    def log(self, metrics: dict, step: int) -> None:
        self.accelerator.log(metrics, step=step)

    def save_checkpoint(self, model, tokenizer, card: str, process_state: dict | None = None) -> Path:
        """checkpoints/checkpoint-STEP of the step reached (see save_checkpoint)."""
        self.state["wall_time_s"] = self.wall_time_before + time.time() - self.started
        return save_checkpoint(
            self.accelerator, model, tokenizer, self.output_dir, self.state[self.step_key], self.state, card,
            self.arguments, self.run.save_total_limit, process_state,
        )

    def finish(self, model, tokenizer, card: str, checkpoint: Path | None, rollouts: Callable | None = None) -> None:
        """The final model at output_dir's root, the closing summary, then the Hub upload (model, and the dataset
        `rollouts()` loads), the trackers closed. A failed upload loses nothing: the run then ends with one `error:`
        line that gives the command pushing the saved outputs later."""
        save_final_model(self.accelerator, model, tokenizer, self.output_dir, card, self.arguments)
        evaluation = "held-out eval" if self.held_out else "eval (not held out: it shares games with training)"
        self.accelerator.print(
            f"{evaluation} on {self.run.eval_games} ({self.run.eval_episodes} episodes, greedy):\n"
            + "".join(f"  {EVAL_LABELS.get(name, name) + ':':<19}{describe(report)}\n" for name, report in self.evals.items())
            + f"model: {self.output_dir} (checkpoint: {checkpoint})"
        )
        push_error = None
        if self.run.push_to_hub and self.accelerator.is_main_process:
            try:
                push_to_hub(self.run.push_to_hub, self.output_dir, rollouts())
            except Exception as error:  # noqa: BLE001 - network, auth, quota: all leave the outputs to push later
                push_error = push_failure_message(self.output_dir, self.run.push_to_hub, error)
        self.accelerator.end_training()
        release_output_dirs()
        if push_error is not None:
            sys.exit(f"error: {push_error}")
