"""What the training scripts share around their algorithm, on top of `accelerate`: the frozen reference model, held-out
evaluation over all processes, the model card's results table, checkpoints (written whole or not at all) and
finding the one to resume from.

Layout of a script's output_dir: the final policy (save_pretrained, tokenizer, README.md model card, training_args.json)
at its root; checkpoints/checkpoint-N holding the same plus training_state/ (accelerator.save_state: weights,
optimizer, RNG states) and trainer_state.json (the step reached, counters, evaluations); rollouts/ (datasets, see
lib/rollout.py); runs/ (tracker logs).
"""

import contextlib
import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object

from lib.evaluation import evaluate, merge_reports
from lib.games import resolve_games
from lib.models import CHECKPOINTS_DIR, newest_checkpoint, save_model
from lib.prompts import PromptConfig
from lib.rollout import ROLLOUTS_DIR
from lib.value_head import PolicyWithValue, save_value_head

TRAINING_STATE_DIR = "training_state"
TRAINER_STATE_FILE = "trainer_state.json"
ARGS_FILE = "training_args.json"
LOG_DIR = "runs"
# Flags a resumed run must keep: they fix the model and its trainable parameters (the checkpoint's weights and
# optimizer state must fit them) and the games' state (which games, how many slots, where each stands). Others may
# change on resume (a resumed run equals the uninterrupted one only when none does).
RESUME_MUST_MATCH = frozenset({
    "model_name_or_path", "dtype", "trainable_layers_fraction", "value_head_type", "value_head_hidden_size",
    "detach_value_head", "action_mode", "train_games", "seed", "num_envs", "max_episode_turns",
})


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


def resolve_game_sets(accelerator, train_games: str, eval_games: str, games_dir: Path, evaluate_too: bool,
                      progress: bool) -> tuple[list[str], list[str]]:
    """Train and eval game files; the main process generates missing games first, the others then find them cached.
    Raises lib.games.GameError for a bad source, ValueError when a process would get no training game."""
    progress = progress and accelerator.is_main_process
    with accelerator.main_process_first():
        train = resolve_games(train_games, "train", games_dir, progress=progress)
        held_out = resolve_games(eval_games, "eval", games_dir, progress=progress) if evaluate_too else []
    if len(train) < accelerator.num_processes:
        raise ValueError(
            f"--train_games has {len(train)} games for {accelerator.num_processes} processes; every process needs one"
        )
    return train, held_out


def build_optimizer(accelerator, parameters: list, learning_rate: float, micro_batch_size: int,
                    gradient_accumulation_steps: int, max_grad_norm: float) -> torch.optim.Optimizer:
    """AdamW, or DeepSpeed's CPU Adam under ZeRO-Offload (which refuses a torch optimizer: the step runs where the
    states live). Under DeepSpeed also sets the batch sizes it would read from a DataLoader we do not have, and its
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

    def __init__(self, accelerator, limit: int):
        self.accelerator = accelerator
        self.limit = limit
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

    def step(self, optimizer, grad_norm, where: str) -> bool:
        """Step the optimizer unless a loss of this step or the gradient norm was NaN or inf; True when it stepped."""
        finite = not self._poisoned and (grad_norm is None or math.isfinite(float(grad_norm)))
        self._poisoned = False
        if finite:
            self.streak = 0
            optimizer.step()
        else:
            self._skip(f"NaN or inf in the loss or gradient at {where}: optimizer step skipped")
        optimizer.zero_grad()
        return finite

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


def find_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str, step_key: str, last_step: int,
                           last_step_flag: str, arguments: dict, world_size: int) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names (`latest`: the newest in output_dir), or None.

    Its trainer_state.json must hold `step_key` (the script's step: iteration, round) below `last_step`, the value of
    `last_step_flag`; it must come from a run with the same values of the RESUME_MUST_MATCH flags (`arguments`) and
    the same number of processes. Raises ValueError naming the flag otherwise.
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
    state = json.loads((folder / TRAINER_STATE_FILE).read_text())
    if step_key not in state:
        raise ValueError(f"--resume_from_checkpoint {folder}: written by another script (no {step_key!r} in {TRAINER_STATE_FILE})")
    if state[step_key] >= last_step:
        raise ValueError(f"{last_step_flag} {last_step}: {folder} already finished {step_key} {state[step_key]}; raise it to continue")
    saved = json.loads((folder / ARGS_FILE).read_text()) if (folder / ARGS_FILE).is_file() else {}
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
    return folder


def process_state_file(folder: Path, rank: int) -> Path:
    return folder / f"process_state-{rank}.json"


def load_process_state(folder: Path, rank: int) -> dict:
    """What save_checkpoint wrote for this process (its environments and histories), as data."""
    return json.loads(process_state_file(folder, rank).read_text())


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool) -> None:
    """A fresh run must not mix its rollouts and checkpoints with an earlier run's."""
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output_dir {output} is a file, not a folder: pass another --output_dir or move the file")
    earlier = [output / CHECKPOINTS_DIR, output / ROLLOUTS_DIR]
    if resume_from_checkpoint is None and any(path.exists() for path in earlier):
        if not overwrite_output_dir:
            raise ValueError(
                f"--output_dir {output} holds an earlier run: pass --resume_from_checkpoint latest to continue it, "
                "--overwrite_output_dir to replace it, or another --output_dir"
            )


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
    return f"normalized score {report['normalized_score']:.3f}, win rate {report['win_rate']:.3f}, invalid rate {report['invalid_rate']:.3f}"


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
    """Policy (save_pretrained) and, for a PolicyWithValue, its value head file; tokenizer, args and model card into
    folder (main process only)."""
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, PolicyWithValue):
        policy_state = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
        head_state = {k.removeprefix("value_head."): v for k, v in state_dict.items() if k.startswith("value_head.")}
        save_model(unwrapped.policy, tokenizer, folder, state_dict=policy_state)
        save_value_head(unwrapped.value_head, folder, head_state)
    else:
        save_model(unwrapped, tokenizer, folder, state_dict=state_dict)
    (folder / ARGS_FILE).write_text(json.dumps(arguments, indent=2))
    (folder / "README.md").write_text(card)


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


def save_final_model(accelerator, model, tokenizer, output_dir: Path, card: str, arguments: dict) -> None:
    """The final policy at output_dir's root, each file moved into place only once all are written."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        temporary = output_dir / ".tmp-final"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        export_model(accelerator, model, tokenizer, temporary, state_dict, card, arguments)
        for path in temporary.iterdir():
            os.replace(path, output_dir / path.name)
        temporary.rmdir()
    accelerator.wait_for_everyone()


def push_to_hub(repo_id: str, output_dir: Path, dataset) -> None:
    """The final model (output_dir without checkpoints, rollouts and logs) to the model repo `repo_id`, and `dataset`
    to the dataset repo of the same name (main process only)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir),
        ignore_patterns=[f"{CHECKPOINTS_DIR}/*", f"{ROLLOUTS_DIR}/*", f"{LOG_DIR}/*", ".tmp-*"],
    )
    dataset.push_to_hub(repo_id)
