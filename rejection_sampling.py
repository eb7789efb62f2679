"""Rejection sampling (expert iteration) for causal LMs playing TextWorld games: play, keep the best, fine-tune, repeat.

Launch:
    python rejection_sampling.py                                   # defaults: SmolLM2-135M, `default` games, CPU ok
    python rejection_sampling.py --keep_top_n 4                    # the 4 best episodes of each round
    python rejection_sampling.py --rank_by turn --min_return 0     # every turn whose return-to-go is above 0
    python rejection_sampling.py my_run.yaml --seed 1              # flags from a YAML file, then overrides
    python rejection_sampling.py --resume_from_checkpoint latest   # continue outputs/rejection_sampling
    accelerate launch --config_file accelerate_configs/zero2.yaml rejection_sampling.py --model_name_or_path ...
    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml rejection_sampling.py   # 2 CPU processes

One round:
  1. play (lib.rollout.play_episodes): episodes_per_round whole episodes on the training games with the current
     policy, sampling, with PPO's prompts and reward chain (the same RolloutArguments); each process plays the
     episodes of its share of the games, num_envs / num_processes at a time;
  2. rank (lib.selection) the turns of all processes together: the candidates are whole episodes (value: return) or
     single turns (value: discounted return-to-go, --gamma), minus rank_kl_coef * the KL to the reference of the
     turns they would train on; keep the top --keep_top_percent or --keep_top_n, and/or those above --min_return
     (the top 25% when no rule is given); equal values keep the earlier episode / turn;
  3. fine-tune on the kept (prompt, command) pairs: the target is the command and the token that ends a reply
     (lib.prompts.answer_text); loss = mean negative log-likelihood over the target tokens only, the prompt masked
     (lib.losses.sft_loss), + kl_coef * exact KL to the reference; num_train_epochs passes over the pairs in shuffled
     batches of train_batch_size pairs (over all processes), each split into gradient_accumulation_steps
     micro-batches per process;
  4. evaluate greedily on held-out games, save the round's turns as a dataset, checkpoint.
A round that keeps nothing is reported and skips step 3.
By default (--action_mode score) the policy plays by choosing among the admissible commands (lib.agents.ScoringAgent:
sampled from the softmax over the candidates' scores in step 1, the best one in evaluation); the fine-tuning target
is the chosen command's text. --action_mode generate makes it write its commands. An optimizer step that meets a NaN
or inf loss or gradient is skipped with a warning; --max_nonfinite_updates in a row stop the run before it saves.

Outputs (output_dir): the final policy (save_pretrained) + tokenizer + README.md, ready for
`play.py --agent model --model_name_or_path outputs/rejection_sampling`; checkpoints/checkpoint-R after every round
(same, plus training_state/ for resuming and trainer_state.json); rollouts/round-NNNNN datasets, one row per played
turn, kept or not (lib.rollout.load_rollouts(output_dir, prefix="round")): round, process, game, episode, step,
prompt, response, command, reward (reward chain), return (the episode's return, or the turn's return-to-go), kl (of
the turn, 0 without --rank_kl_coef), objective (the value ranked), rank (1 = best; a turn has its episode's rank
when ranking episodes), kept, won (the episode was won); runs/ tracker logs.
"""

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from lib.agents import ModelAgent, RandomAgent, ScoringAgent
from lib.arguments import (
    TRACKERS,
    RolloutArguments,
    check_push_to_hub,
    check_report_to,
    check_rollout_arguments,
    generation_config,
    parse_arguments,
    prompt_config,
    reward_config,
    scoring_config,
)
from lib.evaluation import merge_reports
from lib.games import GameError, check_game_source, default_cache_dir
from lib.losses import KL_DIRECTIONS, exact_kl, masked_sum, sft_loss
from lib.models import CHECKPOINTS_DIR, DEFAULT_MODEL, DTYPES, ModelError, load_model, load_tokenizer
from lib.prompts import answer_text
from lib.rollout import ROLLOUTS_DIR, load_rollouts, pack_sequences, play_episodes, save_rollouts
from lib.selection import Selection, returns_to_go, select
from lib.training import (
    LOG_DIR,
    TRAINER_STATE_FILE,
    TRAINING_STATE_DIR,
    NonFiniteError,
    NonFiniteGuard,
    build_accelerator,
    build_optimizer,
    check_output_dir,
    describe,
    eval_metrics,
    evaluation_table,
    find_resume_checkpoint,
    gathered_for_evaluation,
    prepare_reference,
    push_to_hub,
    resolve_game_sets,
    run_evaluation,
    save_checkpoint,
    save_final_model,
)
from lib.value_head import freeze_lower_layers, response_logits

RANK_BY = ("episode", "turn")
DEFAULT_KEEP_TOP_PERCENT = 25.0
ROUND_PREFIX = "round"
# The dataset's columns after `round` (see the module docstring).
ROW_COLUMNS = ("process", "game", "episode", "step", "prompt", "response", "command", "reward", "return", "kl",
               "objective", "rank", "kept", "won")
# Seeds the shuffle of each round's fine-tuning pairs: the same on every process, which take slices of one order.
SHUFFLE_SEED_STRIDE = 1_000_003


@dataclass
class RunArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy: hub id, folder, training output, .gguf, or the packaged SmolLM2-135M."})
    output_dir: str = field(default="outputs/rejection_sampling", metadata={"help": "Where the final model, checkpoints, played turns and logs go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete the checkpoints, played turns and logs of an earlier run in output_dir first."})
    train_games: str = field(default="default", metadata={"help": "Training games: named set, generator spec (tw-coin_collector:level=2:n=4), files, folders or globs."})
    eval_games: str = field(default="default", metadata={"help": "Held-out games for evaluation (a named set or spec uses its eval split)."})
    games_dir: str | None = field(default=None, metadata={"help": "Cache for generated games (default $TEXTWORLD_RL_GAMES or ./games)."})
    num_rounds: int = field(default=4, metadata={"help": "Rounds of play, select, fine-tune."})
    episodes_per_round: int = field(default=16, metadata={"help": "Episodes played per round, in total over all processes."})
    num_envs: int = field(default=8, metadata={"help": "Game slots played in parallel, in total over all processes (play and evaluation)."})
    max_episode_turns: int = field(default=12, metadata={"help": "Commands per episode before it is truncated (training and evaluation)."})
    seed: int = field(default=0, metadata={"help": "Random seed (torch, sampling, the order of the fine-tuning pairs)."})
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    report_to: str = field(default="tensorboard", metadata={"help": f"Tracker: {', '.join(TRACKERS)}."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the final model and the played turns dataset to."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or `latest` (newest in output_dir); training goes on at the next round."})
    eval_episodes: int = field(default=12, metadata={"help": "Held-out episodes per evaluation, before training and after every round (0: none)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many newest checkpoints (0: keep all)."})
    max_nonfinite_updates: int = field(default=3, metadata={"help": "Stop after this many optimizer steps in a row skipped for a NaN or inf loss or gradient."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


@dataclass
class SelectionArguments:
    rank_by: str = field(default="episode", metadata={"help": f"Candidates: {' or '.join(RANK_BY)} (whole episodes by return, or single turns by discounted return-to-go)."})
    gamma: float = field(default=0.95, metadata={"help": "Discount between turns of the return-to-go (--rank_by turn)."})
    keep_top_percent: float | None = field(default=None, metadata={"help": f"Keep this percent of the candidates, in (0, 100], rounded up ({DEFAULT_KEEP_TOP_PERCENT:g} when no keep rule is given)."})
    keep_top_n: int | None = field(default=None, metadata={"help": "Keep this many candidates (all when there are fewer); excludes --keep_top_percent."})
    min_return: float | None = field(default=None, metadata={"help": "Keep only candidates whose value is above this (alone, or on top of a top rule)."})
    rank_kl_coef: float = field(default=0.0, metadata={"help": "Rank by value - this * KL to the reference of the candidate's turns (0: off)."})

    def __post_init__(self):
        if self.keep_top_percent is None and self.keep_top_n is None and self.min_return is None:
            self.keep_top_percent = DEFAULT_KEEP_TOP_PERCENT


@dataclass
class FinetuneArguments:
    num_train_epochs: int = field(default=2, metadata={"help": "Passes over each round's kept pairs."})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate."})
    train_batch_size: int = field(default=8, metadata={"help": "Pairs per optimizer step, in total over all processes."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step on each process."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (DeepSpeed: its gradient_clipping)."})
    kl_coef: float = field(default=0.0, metadata={"help": "Weight of the exact KL to the reference in the loss (0: no reference model is built unless --rank_kl_coef needs it)."})
    kl_direction: str = field(default="reverse", metadata={"help": f"Direction of the KL terms: {', '.join(KL_DIRECTIONS)}."})
    trainable_layers_fraction: float = field(default=0.33, metadata={"help": "Train only this last fraction of decoder layers plus the final norm (and the LM head when not tied to the input embeddings); 1 trains all."})


ALL_ARGUMENTS = (RunArguments, SelectionArguments, FinetuneArguments, RolloutArguments)


def check_arguments(run: RunArguments, selection: SelectionArguments, finetune: FinetuneArguments,
                    rollout: RolloutArguments, world_size: int) -> None:
    """Raise ValueError naming the flag for every bad value or combination; builds nothing heavy."""
    positive = {
        "num_rounds": run.num_rounds, "episodes_per_round": run.episodes_per_round, "num_envs": run.num_envs,
        "max_episode_turns": run.max_episode_turns, "num_train_epochs": finetune.num_train_epochs,
        "learning_rate": finetune.learning_rate, "train_batch_size": finetune.train_batch_size,
        "gradient_accumulation_steps": finetune.gradient_accumulation_steps, "max_grad_norm": finetune.max_grad_norm,
        "max_nonfinite_updates": run.max_nonfinite_updates,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    for name, value in (("eval_episodes", run.eval_episodes), ("save_total_limit", run.save_total_limit),
                        ("kl_coef", finetune.kl_coef), ("rank_kl_coef", selection.rank_kl_coef)):
        if value < 0:
            raise ValueError(f"--{name} must be >= 0, got {value}")
    if selection.rank_by not in RANK_BY:
        raise ValueError(f"--rank_by {selection.rank_by!r} is unknown; choose one of {', '.join(RANK_BY)}")
    if not 0 <= selection.gamma <= 1:
        raise ValueError(f"--gamma must be in [0, 1], got {selection.gamma}")
    if selection.keep_top_percent is not None and selection.keep_top_n is not None:
        raise ValueError("--keep_top_percent and --keep_top_n exclude each other: pass one of them")
    if selection.keep_top_percent is not None and not 0 < selection.keep_top_percent <= 100:
        raise ValueError(f"--keep_top_percent must be in (0, 100], got {selection.keep_top_percent}")
    if selection.keep_top_n is not None and selection.keep_top_n < 1:
        raise ValueError(f"--keep_top_n must be at least 1, got {selection.keep_top_n}")
    if finetune.kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"--kl_direction {finetune.kl_direction!r} is unknown; choose one of {', '.join(KL_DIRECTIONS)}")
    if not 0 < finetune.trainable_layers_fraction <= 1:
        raise ValueError(f"--trainable_layers_fraction must be in (0, 1], got {finetune.trainable_layers_fraction}")
    if run.dtype not in DTYPES:
        raise ValueError(f"--dtype {run.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    check_report_to(run.report_to)
    check_push_to_hub(run.push_to_hub)
    if run.episodes_per_round < world_size:
        raise ValueError(f"--episodes_per_round {run.episodes_per_round} is below the number of processes ({world_size}): every process plays")
    if finetune.train_batch_size % (world_size * finetune.gradient_accumulation_steps):
        raise ValueError(
            f"--train_batch_size {finetune.train_batch_size} must be divisible by the number of processes ({world_size}) "
            f"times --gradient_accumulation_steps {finetune.gradient_accumulation_steps}"
        )
    check_rollout_arguments(rollout)
    for flag, source in (("--train_games", run.train_games), ("--eval_games", run.eval_games)):
        try:
            check_game_source(source)
        except GameError as error:
            raise ValueError(f"{flag}: {error}") from None


def encode_pairs(turns: list[dict], tokenizer, rollout: RolloutArguments) -> None:
    """Token ids of each turn's prompt (as generation saw it) and of its fine-tuning target, in place."""
    config = prompt_config(rollout)
    for turn in turns:
        turn["prompt_ids"] = tokenizer(turn["prompt"], add_special_tokens=False)["input_ids"]
        turn["answer_ids"] = tokenizer(answer_text(turn["command"], config, tokenizer), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_kls(policy, ref_model, turns: list[dict], pad_id: int, batch_size: int, direction: str, device) -> list[float]:
    """Per turn, the exact KL between the policy and the reference summed over its target tokens."""
    kls = []
    for start in range(0, len(turns), batch_size):
        batch = turns[start : start + batch_size]
        packed = pack_sequences([t["prompt_ids"] for t in batch], [t["answer_ids"] for t in batch], pad_id)
        inputs = [packed[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")]
        logits = response_logits(policy, *inputs, packed["start"], packed["end"]).float()
        ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float()
        kls += masked_sum(exact_kl(logits, ref_logits, direction), packed["response_mask"].to(device), dim=1).tolist()
    return kls


def rank_turns(turns: list[dict], selection: SelectionArguments) -> tuple[Selection, list[float]]:
    """Set return, won (the episode's), objective, rank and kept on every turn (all processes' turns, sorted by
    episode and step); returns the Selection (one entry per candidate) and the return of every episode."""
    episodes: dict[int, list[dict]] = {}
    for turn in turns:
        episodes.setdefault(turn["episode"], []).append(turn)
    episode_returns = []
    for episode in episodes.values():
        rewards = [t["reward"] for t in episode]
        episode_returns.append(sum(rewards))
        for turn, to_go in zip(episode, returns_to_go(rewards, selection.gamma)):
            turn["return"] = episode_returns[-1] if selection.rank_by == "episode" else to_go
            turn["won"] = episode[-1]["won"]
    if selection.rank_by == "episode":
        groups = list(episodes.values())
    else:
        groups = [[turn] for turn in turns]
    values = [group[0]["return"] - selection.rank_kl_coef * sum(t["kl"] for t in group) for group in groups]
    chosen = select(values, selection.keep_top_percent, selection.keep_top_n, selection.min_return)
    for group, value, rank, kept in zip(groups, values, chosen.ranks, chosen.kept):
        for turn in group:
            turn.update(objective=value, rank=rank, kept=kept)
    return chosen, episode_returns


def model_card(run: RunArguments, round_: int, evals: dict, action_mode: str) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [textworld, rejection-sampling, expert-iteration]", "---", "",
        f"# Rejection sampling on TextWorld ({round_} rounds)", "",
        f"Fine-tuned from `{run.model_name_or_path}` with `rejection_sampling.py` on games `{run.train_games}`: each "
        "round plays episodes with the policy, keeps the best and fine-tunes on their commands.", "",
        f"Held-out evaluation on `{run.eval_games}` (eval split, greedy {'choice among the admissible commands' if action_mode == 'score' else 'decoding'}):", "",
        *evaluation_table(evals),
        "", "```bash",
        f"python play.py --agent model --model_name_or_path {run.output_dir}" + (" --action_mode generate" if action_mode == "generate" else ""),
        "```", "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    # Every check runs before anything heavy is built; launchers export WORLD_SIZE before starting the script.
    try:
        run, selection, finetune, rollout_args = parse_arguments(ALL_ARGUMENTS, argv)
        check_arguments(run, selection, finetune, rollout_args, int(os.environ.get("WORLD_SIZE", "1")))
        check_output_dir(run.output_dir, run.resume_from_checkpoint, run.overwrite_output_dir)
        arguments = {k: v for group in (run, selection, finetune, rollout_args) for k, v in asdict(group).items()}
        resume_folder = find_resume_checkpoint(run.resume_from_checkpoint, run.output_dir, "round", run.num_rounds,
                                               "--num_rounds", arguments, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as error:
        sys.exit(f"error: {error}")

    run_started = time.time()
    # The reference is a frozen copy of the starting policy, built only when a KL term needs it (it costs a model's
    # memory), and before the Accelerator: once a ZeRO-3 launch has set up DeepSpeed, a copy's weights end up empty.
    set_seed(run.seed)
    try:
        tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
        model = load_model(run.model_name_or_path, run.dtype, "cpu", run.trust_remote_code)
    except ModelError as error:
        sys.exit(f"error: {error}")
    needs_reference = finetune.kl_coef > 0 or selection.rank_kl_coef > 0
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if needs_reference else None
    freeze_lower_layers(model, finetune.trainable_layers_fraction)

    accelerator = build_accelerator(finetune.gradient_accumulation_steps, run.report_to, run.output_dir)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    output_dir = Path(run.output_dir)

    # From here on each process samples differently, the same way on every rerun.
    set_seed(run.seed, device_specific=True)
    datasets.disable_progress_bars()  # one bar per round is enough

    games_dir = Path(run.games_dir) if run.games_dir else default_cache_dir()
    try:
        train_games, eval_games = resolve_game_sets(
            accelerator, run.train_games, run.eval_games, games_dir, run.eval_episodes > 0, run.progress
        )
    except (GameError, ValueError) as error:
        sys.exit(f"error: {error}")
    if run.overwrite_output_dir and accelerator.is_main_process:
        for name in (CHECKPOINTS_DIR, ROLLOUTS_DIR, LOG_DIR):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    accelerator.wait_for_everyone()

    per_process_batch = finetune.train_batch_size // world_size
    micro_batch_size = per_process_batch // finetune.gradient_accumulation_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        accelerator, trainable, finetune.learning_rate, micro_batch_size, finetune.gradient_accumulation_steps,
        finetune.max_grad_norm,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()  # dropout (if the LM has any) only while fine-tuning
    if ref_model is not None:
        ref_model = prepare_reference(ref_model, accelerator)
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3

    # eval_history: one summary per held-out evaluation (learning curves); wall_time_s: summed over resumed runs.
    trainer_state = {"round": 0, "env_steps": 0, "episodes": 0, "wall_time_s": 0.0, "evals": {}, "eval_history": []}
    if resume_folder is not None:
        accelerator.load_state(str(resume_folder / TRAINING_STATE_DIR))
        for group in optimizer.param_groups:  # --learning_rate may change on resume; the saved optimizer has the old
            group["lr"] = finetune.learning_rate
        trainer_state = json.loads((resume_folder / TRAINER_STATE_FILE).read_text())
        accelerator.print(f"resumed from {resume_folder} at round {trainer_state['round']}")
    start_round = trainer_state["round"] + 1
    wall_time_before = trainer_state["wall_time_s"]
    guard = NonFiniteGuard(accelerator, run.max_nonfinite_updates)

    def record_evaluation(report: dict | None) -> None:
        if report:
            trainer_state["eval_history"].append(
                {"round": trainer_state["round"], "env_steps": trainer_state["env_steps"],
                 **{key: report[key] for key in ("normalized_score", "win_rate", "invalid_rate", "mean_steps")}}
            )

    if run.report_to != "none":
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in arguments.items()}
        accelerator.init_trackers(LOG_DIR, config=config)

    unwrapped = accelerator.unwrap_model(model)
    prompts, rewards = prompt_config(rollout_args), reward_config(rollout_args)
    if rollout_args.action_mode == "score":
        sampling_agent = ScoringAgent(unwrapped, tokenizer, prompts, scoring_config(rollout_args))
        greedy_agent = ScoringAgent(unwrapped, tokenizer, prompts, scoring_config(rollout_args, greedy=True))
    else:
        sampling_agent = ModelAgent(unwrapped, tokenizer, generation_config(rollout_args))
        greedy_agent = ModelAgent(unwrapped, tokenizer, generation_config(rollout_args, greedy=True))
    per_process_envs = max(1, run.num_envs // world_size)
    pad_id, device = tokenizer.pad_token_id, accelerator.device

    def evaluate_held_out(agent) -> dict | None:
        with gathered_for_evaluation(model, zero3), accelerator.autocast():
            return run_evaluation(
                accelerator, agent, eval_games, run.eval_episodes, run.num_envs, run.max_episode_turns, prompts,
                tokenizer, run.seed,
            )

    evals = trainer_state["evals"]
    if "random" not in evals:
        evals["random"] = evaluate_held_out(RandomAgent(run.seed))
        started = time.time()
        evals["before"] = evaluate_held_out(greedy_agent)
        accelerator.log({**eval_metrics(evals["before"]), "perf/eval_s": time.time() - started}, step=0)
        record_evaluation(evals["before"])
        accelerator.print(f"before training: {describe(evals['before'])} (random-admissible: {describe(evals['random'])})")

    bar = tqdm(
        range(start_round, run.num_rounds + 1), desc="rejection sampling",
        disable=not (run.progress and accelerator.is_main_process), initial=start_round - 1, total=run.num_rounds,
    )
    checkpoint = None
    for round_ in bar:
        # ---- 1. play whole episodes with the sampling policy
        started = time.time()
        with gathered_for_evaluation(model, zero3), accelerator.autocast():
            turns, play_report = play_episodes(
                sampling_agent, train_games, run.episodes_per_round, per_process_envs, run.max_episode_turns, prompts,
                tokenizer, rewards, run.seed, rank, world_size,
            )
        play_time = time.time() - started
        for turn in turns:
            turn["process"] = rank
        encode_pairs(turns, tokenizer, rollout_args)

        # ---- 2. rank and keep, over the turns of all processes
        turns = sorted(gather_object(turns), key=lambda t: (t["episode"], t["step"]))
        if selection.rank_kl_coef > 0:
            # Each process scores an equal slice of all turns (padded with its last one), so that the reference's
            # forward calls pair up across processes under ZeRO-3; the KLs are then gathered back.
            mine = list(range(rank, len(turns), world_size))
            padded = mine + mine[-1:] * (math.ceil(len(turns) / world_size) - len(mine))
            with gathered_for_evaluation(model, zero3), accelerator.autocast():
                kls = answer_kls(unwrapped, ref_model, [turns[i] for i in padded], pad_id, micro_batch_size,
                                 finetune.kl_direction, device)
            for index, kl in gather_object(list(zip(mine, kls))):
                turns[index]["kl"] = kl
        else:
            for turn in turns:
                turn["kl"] = 0.0
        chosen, episode_returns = rank_turns(turns, selection)
        kept = [turn for turn in turns if turn["kept"]]
        if chosen.note and accelerator.is_main_process:
            bar.write(f"round {round_}: {chosen.note}")
        rows = [{"round": round_, **{key: turn[key] for key in ROW_COLUMNS}} for turn in turns]
        if accelerator.is_main_process:
            save_rollouts(rows, output_dir, round_, prefix=ROUND_PREFIX)

        # ---- 3. fine-tune on the kept (prompt, command) pairs
        totals: dict[str, float] = {}
        num_micro_batches, num_optimizer_steps, train_tokens, train_time = 0, 0, 0, 0.0
        if not kept:
            if accelerator.is_main_process:
                bar.write(f"round {round_}: kept none of {len(chosen.ranks)} {selection.rank_by}s; no fine-tuning this round")
        else:
            started = time.time()
            model.train()
            generator = torch.Generator().manual_seed(run.seed + SHUFFLE_SEED_STRIDE * round_)
            steps_per_epoch = math.ceil(len(kept) / finetune.train_batch_size)
            for _ in range(finetune.num_train_epochs):
                order = torch.randperm(len(kept), generator=generator).tolist()
                # Wrapped around to whole batches: every process then makes the same number of forward and backward
                # calls (DeepSpeed and DDP pair them up), and every optimizer step sees train_batch_size pairs.
                order = [order[i % len(kept)] for i in range(steps_per_epoch * finetune.train_batch_size)]
                for step in range(steps_per_epoch):
                    batch = order[step * finetune.train_batch_size : (step + 1) * finetune.train_batch_size][rank::world_size]
                    for micro_start in range(0, per_process_batch, micro_batch_size):
                        pairs = [kept[i] for i in batch[micro_start : micro_start + micro_batch_size]]
                        packed = pack_sequences([t["prompt_ids"] for t in pairs], [t["answer_ids"] for t in pairs], pad_id)
                        inputs = [packed[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")]
                        train_tokens += int(packed["attention_mask"].sum())
                        with accelerator.accumulate(model):
                            logits = response_logits(model, *inputs, packed["start"], packed["end"]).float()
                            ref_logits = None
                            if finetune.kl_coef > 0:
                                with torch.no_grad():
                                    ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float()
                            loss, stats = sft_loss(
                                logits, packed["response_ids"].to(device), packed["response_mask"].to(device), ref_logits,
                                finetune.kl_coef, finetune.kl_direction,
                            )
                            finite = guard.finite_loss(loss)
                            if finite:
                                accelerator.backward(loss)
                            if accelerator.sync_gradients:
                                grad_norm = accelerator.clip_grad_norm_(trainable, finetune.max_grad_norm)
                                if guard.step(optimizer, grad_norm, f"round {round_}"):
                                    totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm or 0.0)
                                    num_optimizer_steps += 1
                        if finite:
                            for key, value in stats.items():
                                totals[key] = totals.get(key, 0.0) + float(value)
                            num_micro_batches += 1
            model.eval()
            train_time = time.time() - started

        # ---- 4. metrics, held-out evaluation, checkpoint
        play_report = merge_reports(gather_object([play_report]))
        trainer_state["round"] = round_
        trainer_state["env_steps"] += len(turns)
        trainer_state["episodes"] += len(episode_returns)
        metrics = {
            "charts/episodic_return": sum(episode_returns) / len(episode_returns),
            "charts/normalized_score": play_report["normalized_score"],
            "charts/win_rate": play_report["win_rate"],
            "charts/episode_length": play_report["mean_steps"],
            "charts/invalid_rate": play_report["invalid_rate"],
            "charts/env_steps": trainer_state["env_steps"],
            "selection/candidates": len(chosen.ranks),
            "selection/kept": chosen.num_kept,
            "selection/kept_pairs": len(kept),
            "selection/objective_mean": sum(t["objective"] for t in turns) / len(turns),
            "perf/play_s": play_time,
            "perf/env_steps_per_s": len(turns) / max(play_time, 1e-9),
            "losses/skipped_updates": guard.skipped,
        }
        if kept:
            metrics["selection/kept_objective_mean"] = sum(t["objective"] for t in kept) / len(kept)
            local = {f"losses/{key}": value / max(num_micro_batches, 1) for key, value in totals.items() if key != "grad_norm"}
            local["losses/grad_norm"] = totals.get("grad_norm", 0.0) / max(num_optimizer_steps, 1)
            local["perf/train_s"] = train_time
            local["perf/tokens_per_s"] = train_tokens / max(train_time, 1e-9)
            reduced = accelerator.reduce(torch.tensor(list(local.values()), dtype=torch.float64, device=device), "mean")
            metrics.update(zip(local, reduced.tolist()))
        started = time.time()
        evals[f"round {round_}"] = evaluate_held_out(greedy_agent)
        metrics.update({**eval_metrics(evals[f"round {round_}"]), "perf/eval_s": time.time() - started})
        record_evaluation(evals[f"round {round_}"])
        trainer_state["wall_time_s"] = wall_time_before + time.time() - run_started
        accelerator.log(metrics, step=round_)
        bar.set_postfix({
            "return": f"{metrics['charts/episodic_return']:.2f}",
            "kept": f"{chosen.num_kept}/{len(chosen.ranks)}",
            "nll": f"{metrics.get('losses/nll', float('nan')):.3f}",
            "eval": f"{metrics.get('eval/normalized_score', float('nan')):.3f}",
        })
        checkpoint = save_checkpoint(
            accelerator, model, tokenizer, output_dir, round_, trainer_state, model_card(run, round_, evals, rollout_args.action_mode), arguments,
            run.save_total_limit,
        )
    bar.close()

    # ---- final model, hub, summary
    card = model_card(run, run.num_rounds, evals, rollout_args.action_mode)
    save_final_model(accelerator, model, tokenizer, output_dir, card, arguments)
    if run.push_to_hub and accelerator.is_main_process:
        push_to_hub(run.push_to_hub, output_dir, load_rollouts(output_dir, prefix=ROUND_PREFIX))
    accelerator.print(
        f"held-out eval on {run.eval_games} ({run.eval_episodes} episodes, greedy):\n"
        + "".join(f"  {name + ':':<10} {describe(report)}\n" for name, report in evals.items())
        + f"model: {output_dir} (checkpoint: {checkpoint})"
    )
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except NonFiniteError as error:  # raised on every process alike; the checkpoints written so far stay as they are
        sys.exit(f"error: {error}")
