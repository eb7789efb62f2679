"""PPO for causal LMs playing TextWorld games: each turn the policy chooses (default) or writes a command, the games
score it.

Launch:
    python ppo_textworld.py                                     # defaults: SmolLM2-135M, `default` games, CPU ok
    python ppo_textworld.py --action_mode generate              # write commands instead of choosing admissible ones
    python ppo_textworld.py --action_mode generate --reward letter_e  # the toy task: say many 'e'
    python ppo_textworld.py configs/ppo_hard.yaml --seed 1      # flags from a YAML file, then overrides
    python ppo_textworld.py --resume_from_checkpoint latest     # continue outputs/ppo where it stopped
    accelerate launch --config_file accelerate_configs/zero2.yaml ppo_textworld.py --model_name_or_path ...
    accelerate launch --config_file accelerate_configs/cpu_zero2.yaml ppo_textworld.py   # 2 CPU processes

One iteration (as --action_mode generate runs it; score mode, the default, below):
  1. rollout (lib/rollout.py): each process plays turns_per_slot turns in its num_envs / num_processes game slots;
     per response token it caches the behaviour log-prob, the reference log-prob and the value; per turn the
     reward chain total (lib/rewards.py) and next_value, the value of the state the turn led to (0 after a
     terminated episode, the episode's final state after a truncated one; see lib/rollout.py for positions);
  2. rewards per token: -kl_coef * KL estimate (k1/k2/k3 of log pi - log ref) at every token, plus the turn's
     reward on its last token (lib.losses.penalized_rewards);
  3. token-level GAE inside each response (lib.losses.gae_advantages): gamma_token and lam between tokens,
     gamma_turn * next_value at the last token; returns = advantages + values; advantages whitened over the batch
     (optionally over all processes);
  4. ppo_epochs passes over shuffled minibatches of turns, each split into gradient_accumulation_steps
     micro-batches; loss = clipped policy loss + vf_coef * clipped value loss - ent_coef * entropy
     (+ kl_loss_coef * exact KL to the reference), averaged over every token of every turn of the micro-batch;
  5. the adaptive KL controller (if on) moves kl_coef toward target_kl; metrics are logged, the rollout is saved
     as a dataset, and every eval_every / save_every iterations the policy is evaluated greedily on held-out games
     and checkpointed.
An update that meets a NaN or inf (loss, gradient norm, rewards, values, advantages) is skipped with a warning
(lib.training.NonFiniteGuard); --max_nonfinite_updates in a row stop the run before it saves.
Log-probs, entropy and the KL terms use logits divided by the sampling temperature (top-k/top-p truncation is
ignored), so the behaviour policy is the one that sampled.

--action_mode score (the default): PPO at turn level over the admissible commands (lib/scoring.py). The policy of a turn is
softmax(scores / temperature) over the state's candidates (at most --max_candidates; a score is the sum, or with
--length_normalize the mean, of the command's token log-probs); the rollout (lib.rollout.ScoringRolloutCollector)
caches the behaviour and reference log-probs over the candidates and the value at the prompt's last token, from the
same forward. Each turn then counts as a one-token response: the KL penalty (k1/k2/k3 on the chosen command) joins
the turn's reward, advantages are turn-level GAE over each slot's turns (lib.losses.turn_gae: gamma_turn, lam;
gamma_token unused), and the loss (lib.losses.candidate_ppo_loss) clips the ratio of the chosen command's
probability, with entropy and exact KL (kl_loss_coef) over the candidates; every micro-batch rescores its turns'
candidates with gradient (lib.scoring.candidate_logprobs_packed: one row per state, so backward keeps each prompt's
keys and values once). Evaluation chooses the best-scoring candidate (lib.agents.ScoringAgent).

Outputs (output_dir): the final policy (save_pretrained) + value_head.safetensors + tokenizer + README.md, ready
for `play.py --agent model --model_name_or_path outputs/ppo`; checkpoints/checkpoint-N (same, plus
training_state/ for resuming, trainer_state.json, and process_state-RANK.json: where each game slot stands, so that
a resumed run continues its episodes and ends as the uninterrupted run would); rollouts/iteration-NNNNN datasets (lib.rollout.load_rollouts);
runs/ tensorboard logs.
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
from lib.env import BatchEnv
from lib.games import GameError, check_game_source, default_cache_dir
from lib.losses import (
    KL_DIRECTIONS,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    candidate_ppo_loss,
    explained_variance,
    gae_advantages,
    kl_estimate,
    masked_mean,
    masked_moments,
    masked_whiten,
    mean_var_from_moments,
    penalized_rewards,
    ppo_loss,
    whiten_with_stats,
)
from lib.models import (
    CHECKPOINTS_DIR,
    DEFAULT_MODEL,
    DTYPES,
    ModelError,
    load_model,
    load_tokenizer,
)
from lib.rollout import (
    RolloutCollector,
    ScoringRolloutCollector,
    collate,
    collate_candidates,
    load_rollouts,
    pack_sequences,
    rollout_rows,
    save_rollouts,
    score_candidates,
    turn_advantages,
)
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
    load_process_state,
    prepare_reference,
    push_to_hub,
    resolve_game_sets,
    run_evaluation,
    save_checkpoint,
    save_final_model,
)
from lib.value_head import (
    VALUE_HEAD_TYPES,
    PolicyWithValue,
    ValueHead,
    freeze_lower_layers,
    response_logits,
)


@dataclass
class RunArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy: hub id, folder, training output, .gguf, or the packaged SmolLM2-135M."})
    output_dir: str = field(default="outputs/ppo", metadata={"help": "Where the final model, checkpoints, rollouts and logs go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete the checkpoints, rollouts and logs of an earlier run in output_dir first."})
    train_games: str = field(default="default", metadata={"help": "Training games: named set, generator spec (tw-coin_collector:level=2:n=4), files, folders or globs."})
    eval_games: str = field(default="default", metadata={"help": "Held-out games for evaluation (a named set or spec uses its eval split)."})
    games_dir: str | None = field(default=None, metadata={"help": "Cache for generated games (default $TEXTWORLD_RL_GAMES or ./games)."})
    num_iterations: int = field(default=6, metadata={"help": "PPO iterations (rollout + update)."})
    num_envs: int = field(default=8, metadata={"help": "Game slots played in parallel, in total over all processes."})
    turns_per_slot: int = field(default=8, metadata={"help": "Turns per slot per iteration; batch = num_envs * turns_per_slot turns."})
    max_episode_turns: int = field(default=12, metadata={"help": "Commands per episode before it is truncated (training and evaluation)."})
    seed: int = field(default=0, metadata={"help": "Random seed (torch, sampling, game order)."})
    dtype: str = field(default="float32", metadata={"help": f"Weights dtype: {', '.join(DTYPES)}."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    report_to: str = field(default="tensorboard", metadata={"help": f"Tracker: {', '.join(TRACKERS)}."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub repo id to push the final model and the rollout dataset to."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder, or `latest` (newest in output_dir)."})
    eval_every: int = field(default=2, metadata={"help": "Evaluate every N iterations (0: only before and after training)."})
    eval_episodes: int = field(default=12, metadata={"help": "Episodes per evaluation (0: no evaluation)."})
    save_every: int = field(default=2, metadata={"help": "Checkpoint every N iterations (0: only at the end); a stopped run resumes from the newest."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many newest checkpoints (0: keep all)."})
    max_nonfinite_updates: int = field(default=3, metadata={"help": "Stop after this many updates in a row skipped for a NaN or inf in the loss, gradient, rewards or advantages."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


@dataclass
class PPOArguments:
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW learning rate (5e-5 moves the last third of SmolLM2-135M within a few iterations)."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout batch."})
    num_minibatches: int = field(default=2, metadata={"help": "Optimizer steps per epoch; each process's batch splits into this many minibatches."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per minibatch (gradients summed before the step)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (DeepSpeed: its gradient_clipping)."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Value clip range around the rollout values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    ent_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    gamma_token: float = field(default=1.0, metadata={"help": "Discount between tokens of one response."})
    gamma_turn: float = field(default=0.95, metadata={"help": "Discount between turns (applied to next_value)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda between tokens."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient in the per-token reward (initial value when adaptive)."})
    kl_estimator: str = field(default="k3", metadata={"help": f"Per-token KL estimator in the reward: {', '.join(KL_ESTIMATORS)}."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef toward target_kl (Ziegler et al. 2019)."})
    target_kl: float = field(default=0.1, metadata={"help": "Target KL per turn (summed over its tokens) for the adaptive controller."})
    kl_horizon: float = field(default=10000.0, metadata={"help": "Horizon (turns) of the adaptive KL controller."})
    kl_loss_coef: float = field(default=0.0, metadata={"help": "Weight of an exact-gradient KL loss to the reference (0: off)."})
    kl_direction: str = field(default="reverse", metadata={"help": f"Direction of the exact KL loss: {', '.join(KL_DIRECTIONS)}."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the batch."})
    whiten_across_processes: bool = field(default=False, metadata={"help": "Whiten with statistics of all processes' batches."})


@dataclass
class ModelArguments:
    value_head_type: str = field(default="linear", metadata={"help": f"Value head: {', '.join(VALUE_HEAD_TYPES)} (mlp: 2 layers)."})
    value_head_hidden_size: int = field(default=0, metadata={"help": "Hidden width of the mlp value head (0: the LM's hidden size)."})
    detach_value_head: bool = field(default=False, metadata={"help": "Detach the value head's input: the value loss does not move the LM."})
    trainable_layers_fraction: float = field(default=0.33, metadata={"help": "Train only this last fraction of decoder layers plus the final norm (and the LM head when not tied to the input embeddings); 1 trains all."})


ALL_ARGUMENTS = (RunArguments, PPOArguments, ModelArguments, RolloutArguments)


def check_arguments(run: RunArguments, ppo: PPOArguments, model: ModelArguments, rollout: RolloutArguments, world_size: int):
    """Raise ValueError naming the flag for every bad value or combination; builds nothing heavy."""
    positive = {
        "num_iterations": run.num_iterations, "num_envs": run.num_envs, "turns_per_slot": run.turns_per_slot,
        "max_episode_turns": run.max_episode_turns, "ppo_epochs": ppo.ppo_epochs, "num_minibatches": ppo.num_minibatches,
        "gradient_accumulation_steps": ppo.gradient_accumulation_steps, "learning_rate": ppo.learning_rate,
        "clip_range": ppo.clip_range, "clip_range_value": ppo.clip_range_value, "max_grad_norm": ppo.max_grad_norm,
        "kl_horizon": ppo.kl_horizon, "max_nonfinite_updates": run.max_nonfinite_updates,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    for name in ("eval_every", "eval_episodes", "save_every", "save_total_limit"):
        if getattr(run, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(run, name)}")
    for name in ("vf_coef", "ent_coef", "kl_coef", "kl_loss_coef"):
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
    if model.value_head_type not in VALUE_HEAD_TYPES:
        raise ValueError(f"--value_head_type {model.value_head_type!r} is unknown; choose one of {', '.join(VALUE_HEAD_TYPES)}")
    if not 0 < model.trainable_layers_fraction <= 1:
        raise ValueError(f"--trainable_layers_fraction must be in (0, 1], got {model.trainable_layers_fraction}")
    if model.value_head_hidden_size < 0:
        raise ValueError(f"--value_head_hidden_size must be >= 0, got {model.value_head_hidden_size}")
    if run.dtype not in DTYPES:
        raise ValueError(f"--dtype {run.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    check_report_to(run.report_to)
    check_push_to_hub(run.push_to_hub)
    if run.num_envs % world_size:
        raise ValueError(f"--num_envs {run.num_envs} must be divisible by the number of processes ({world_size})")
    per_process = run.num_envs // world_size * run.turns_per_slot
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
    check_rollout_arguments(rollout)
    for flag, source in (("--train_games", run.train_games), ("--eval_games", run.eval_games)):
        try:
            check_game_source(source)
        except GameError as error:
            raise ValueError(f"{flag}: {error}") from None


def model_card(run: RunArguments, iteration: int, evals: dict, action_mode: str) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [textworld, ppo, reinforcement-learning]", "---", "",
        f"# PPO on TextWorld ({iteration} iterations)", "",
        f"Fine-tuned from `{run.model_name_or_path}` with `ppo_textworld.py` on games `{run.train_games}`.",
        "A value head for further PPO training is in `value_head.safetensors`.", "",
        f"Held-out evaluation on `{run.eval_games}` (eval split, greedy {'choice among the admissible commands' if action_mode == 'score' else 'decoding'}):", "",
        *evaluation_table(evals),
    ]
    play = f"python play.py --agent model --model_name_or_path {run.output_dir}"
    lines += ["", "```bash", play + (" --action_mode generate" if action_mode == "generate" else ""), "```", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    # Every check runs before anything heavy is built; launchers export WORLD_SIZE before starting the script.
    try:
        run, ppo, model_args, rollout_args = parse_arguments(ALL_ARGUMENTS, argv)
        check_arguments(run, ppo, model_args, rollout_args, int(os.environ.get("WORLD_SIZE", "1")))
        check_output_dir(run.output_dir, run.resume_from_checkpoint, run.overwrite_output_dir)
        arguments = {k: v for group in (run, ppo, model_args, rollout_args) for k, v in asdict(group).items()}
        resume_folder = find_resume_checkpoint(
            run.resume_from_checkpoint, run.output_dir, "iteration", run.num_iterations, "--num_iterations", arguments,
            int(os.environ.get("WORLD_SIZE", "1")),
        )
    except ValueError as error:
        sys.exit(f"error: {error}")

    run_started = time.time()
    # Models: policy + value head as one module; the reference is a frozen copy of the starting policy. Built before
    # the Accelerator: once a ZeRO-3 launch has set up DeepSpeed, the copy's weights end up emptied with the policy's.
    set_seed(run.seed)
    try:
        tokenizer = load_tokenizer(run.model_name_or_path, run.trust_remote_code)
        policy = load_model(run.model_name_or_path, run.dtype, "cpu", run.trust_remote_code)
    except ModelError as error:
        sys.exit(f"error: {error}")
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    freeze_lower_layers(policy, model_args.trainable_layers_fraction)
    value_head = ValueHead(
        policy.config.hidden_size, model_args.value_head_type, model_args.value_head_hidden_size, model_args.detach_value_head
    ).to(policy.dtype)
    model = PolicyWithValue(policy, value_head)

    accelerator = build_accelerator(ppo.gradient_accumulation_steps, run.report_to, run.output_dir)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    output_dir = Path(run.output_dir)

    # From here on each process samples differently, the same way on every rerun.
    set_seed(run.seed, device_specific=True)
    datasets.disable_progress_bars()  # one bar per iteration is enough

    games_dir = Path(run.games_dir) if run.games_dir else default_cache_dir()
    try:
        train_games, eval_games = resolve_game_sets(
            accelerator, run.train_games, run.eval_games, games_dir, run.eval_episodes > 0, run.progress
        )
    except (GameError, ValueError) as error:
        sys.exit(f"error: {error}")
    if run.overwrite_output_dir and accelerator.is_main_process:
        for name in (CHECKPOINTS_DIR, "rollouts", LOG_DIR):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    accelerator.wait_for_everyone()

    per_process_envs = run.num_envs // world_size
    batch_size = per_process_envs * run.turns_per_slot
    minibatch_size = batch_size // ppo.num_minibatches
    micro_batch_size = minibatch_size // ppo.gradient_accumulation_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(
        accelerator, trainable, ppo.learning_rate, micro_batch_size, ppo.gradient_accumulation_steps, ppo.max_grad_norm
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.eval()  # dropout (if the LM has any) only while updating
    ref_model = prepare_reference(ref_model, accelerator)
    plugin = accelerator.state.deepspeed_plugin
    zero3 = plugin is not None and plugin.zero_stage == 3
    generate_kwargs = {"synced_gpus": True} if zero3 else {}

    kl_controller = (
        AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.adaptive_kl else FixedKLController(ppo.kl_coef)
    )
    # eval_history: one summary per held-out evaluation (learning curves); wall_time_s: summed over resumed runs.
    # The KL controller lives here, in JSON: accelerate would pickle a registered object and unpickle it on resume.
    trainer_state = {"iteration": 0, "env_steps": 0, "episodes": 0, "wall_time_s": 0.0, "evals": {}, "eval_history": [],
                     "kl_controller": kl_controller.state_dict()}
    if resume_folder is not None:
        accelerator.load_state(str(resume_folder / TRAINING_STATE_DIR))
        for group in optimizer.param_groups:  # --learning_rate may change on resume; the saved optimizer has the old
            group["lr"] = ppo.learning_rate
        trainer_state = json.loads((resume_folder / TRAINER_STATE_FILE).read_text())
        kl_controller.load_state_dict(trainer_state["kl_controller"])
        accelerator.print(f"resumed from {resume_folder} at iteration {trainer_state['iteration']}")
    start_iteration = trainer_state["iteration"] + 1
    wall_time_before = trainer_state["wall_time_s"]

    def record_evaluation(report: dict | None) -> None:
        if report:
            trainer_state["eval_history"].append(
                {"iteration": trainer_state["iteration"], "env_steps": trainer_state["env_steps"],
                 **{key: report[key] for key in ("normalized_score", "win_rate", "invalid_rate", "mean_steps")}}
            )

    if run.report_to != "none":
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in arguments.items()}
        accelerator.init_trackers(LOG_DIR, config=config)

    unwrapped = accelerator.unwrap_model(model)
    score_mode = rollout_args.action_mode == "score"
    if score_mode:
        greedy_agent = ScoringAgent(unwrapped.policy, tokenizer, prompt_config(rollout_args), scoring_config(rollout_args, greedy=True))
    else:
        greedy_agent = ModelAgent(unwrapped.policy, tokenizer, generation_config(rollout_args, greedy=True))
    evals = trainer_state["evals"]
    if "random" not in evals:
        evals["random"] = run_evaluation(
            accelerator, RandomAgent(run.seed), eval_games, run.eval_episodes, run.num_envs, run.max_episode_turns,
            prompt_config(rollout_args), tokenizer, run.seed,
        )
        started = time.time()
        with gathered_for_evaluation(model, zero3), accelerator.autocast():
            evals["before"] = run_evaluation(
                accelerator, greedy_agent, eval_games, run.eval_episodes, run.num_envs, run.max_episode_turns,
                prompt_config(rollout_args), tokenizer, run.seed,
            )
        accelerator.log({**eval_metrics(evals["before"]), "perf/eval_s": time.time() - started}, step=0)
        record_evaluation(evals["before"])
        accelerator.print(f"before training: {describe(evals['before'])} (random-admissible: {describe(evals['random'])})")

    env = BatchEnv(train_games, per_process_envs, run.max_episode_turns, shuffle=True, seed=run.seed, rank=rank,
                   world_size=world_size)
    if score_mode:
        collector = ScoringRolloutCollector(
            env, tokenizer, prompt_config(rollout_args), scoring_config(rollout_args), reward_config(rollout_args),
            accelerator.autocast,
        )
    else:
        collector = RolloutCollector(
            env, tokenizer, prompt_config(rollout_args), generation_config(rollout_args), reward_config(rollout_args),
            generate_kwargs, accelerator.autocast,
        )
    if resume_folder is not None:  # the games continue where the checkpoint left them
        collector.load_state_dict(load_process_state(resume_folder, rank)["rollout"])
    guard = NonFiniteGuard(accelerator, run.max_nonfinite_updates)
    temperature = rollout_args.temperature
    pad_id = tokenizer.pad_token_id
    device = accelerator.device

    bar = tqdm(
        range(start_iteration, run.num_iterations + 1), desc="ppo", disable=not (run.progress and accelerator.is_main_process),
        initial=start_iteration - 1, total=run.num_iterations,
    )
    checkpoint = None
    for iteration in bar:
        # ---- 1. rollout
        started = time.time()
        rollout = collector.collect(unwrapped, ref_model, run.turns_per_slot)
        rollout_time = time.time() - started
        turns = rollout.transitions
        batch = collate_candidates(turns) if score_mode else collate(turns, pad_id)
        mask = batch["mask"]  # score mode: each turn is a one-token response, (N, 1)

        # ---- 2-3. per-token rewards, GAE, whitening
        kl = kl_estimate(batch["logprobs"], batch["ref_logprobs"], ppo.kl_estimator) * mask
        rewards = penalized_rewards(kl, batch["rewards"], mask, kl_controller.value)
        if score_mode:
            advantages, returns = turn_advantages(rewards[:, 0], batch, per_process_envs, ppo.gamma_turn, ppo.lam)
        else:
            advantages, returns = gae_advantages(
                rewards, batch["values"], mask, batch["next_values"], batch["dones"], ppo.gamma_token, ppo.gamma_turn, ppo.lam
            )
        raw_advantages = advantages
        if ppo.whiten_advantages and ppo.whiten_across_processes:
            moments = accelerator.reduce(torch.stack(masked_moments(advantages.double(), mask)).to(device), "sum").cpu()
            mean, var = mean_var_from_moments(*moments)
            advantages = whiten_with_stats(advantages, mean.float(), var.float(), mask=mask)
        elif ppo.whiten_advantages and mask.sum() > 1:  # a variance needs two tokens (num_envs = turns_per_slot = 1)
            advantages = masked_whiten(advantages, mask)

        # ---- 4. PPO epochs over shuffled minibatches of turns. Each minibatch is gradient_accumulation_steps
        # consecutive micro-batches of the shuffled order; accelerate steps the optimizer after the last of them.
        started = time.time()
        model.train()
        totals: dict[str, float] = {}
        num_micro_batches, num_optimizer_steps, update_tokens = 0, 0, 0  # micro-batches with a finite loss
        width = mask.shape[1]
        where = f"iteration {iteration}"
        finite_batch = guard.finite_batch([batch["rewards"], batch["values"], batch["logprobs"], advantages, returns], where)
        for _ in range(ppo.ppo_epochs if finite_batch else 0):
            order = torch.randperm(batch_size)
            for micro_start in range(0, batch_size, micro_batch_size):
                index = order[micro_start : micro_start + micro_batch_size]
                if score_mode:
                    prompt_ids, candidate_ids = [turns[i].prompt_ids for i in index], [turns[i].candidate_ids for i in index]
                    update_tokens += sum(len(ids) + sum(map(len, rows)) for ids, rows in zip(prompt_ids, candidate_ids))
                else:
                    packed = pack_sequences([turns[i].prompt_ids for i in index], [turns[i].response_ids for i in index], pad_id, width)
                    inputs = [packed[key].to(device) for key in ("input_ids", "attention_mask", "position_ids")]
                    update_tokens += int(packed["attention_mask"].sum())
                with accelerator.accumulate(model):
                    if score_mode:
                        # The candidates rescored with gradient; the value comes from the same prompt forward.
                        scored = score_candidates(
                            model, ref_model if ppo.kl_loss_coef > 0 else None, prompt_ids, candidate_ids, pad_id,
                            rollout_args.length_normalize, temperature,
                        )
                        loss, stats = candidate_ppo_loss(
                            scored["logprobs"], scored["mask"], batch["chosen"][index].to(device),
                            batch["logprobs"][index, 0].to(device), scored["values"], batch["values"][index, 0].to(device),
                            advantages[index, 0].to(device), returns[index, 0].to(device), ppo.clip_range,
                            ppo.clip_range_value, ppo.vf_coef, ppo.ent_coef, scored["ref_logprobs"], ppo.kl_loss_coef,
                            ppo.kl_direction,
                        )
                    else:
                        logits, values = model(*inputs, packed["start"], packed["end"])
                        ref_logits = None
                        if ppo.kl_loss_coef > 0:
                            with torch.no_grad():
                                ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float() / temperature
                        loss, stats = ppo_loss(
                            logits.float() / temperature, values.float(), batch["response_ids"][index].to(device),
                            mask[index].to(device), batch["logprobs"][index].to(device), batch["values"][index].to(device),
                            advantages[index].to(device), returns[index].to(device), ppo.clip_range, ppo.clip_range_value,
                            ppo.vf_coef, ppo.ent_coef, ref_logits, ppo.kl_loss_coef, ppo.kl_direction,
                        )
                    finite = guard.finite_loss(loss)
                    if finite:
                        accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(trainable, ppo.max_grad_norm)
                        if guard.step(optimizer, grad_norm, where):
                            totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm or 0.0)
                            num_optimizer_steps += 1
                if finite:
                    for key, value in stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                    num_micro_batches += 1
        model.eval()
        update_time = time.time() - started

        # ---- 5. KL controller, metrics, rollout dataset
        seq_kl = (kl * mask).sum(dim=1)
        mean_kl = float(accelerator.reduce(seq_kl.mean().to(device), "mean"))
        kl_controller.update(mean_kl, batch_size * world_size)
        episodes = rollout.episodes
        episode_sums = torch.tensor(
            [len(episodes), sum(e["return"] for e in episodes), sum(e["normalized_score"] for e in episodes),
             sum(e["won"] for e in episodes), sum(e["length"] for e in episodes),
             sum(t.invalid for t in turns), len(turns), rollout.generated_tokens, update_tokens],
            dtype=torch.float64, device=device,
        )
        sums = accelerator.reduce(episode_sums, "sum").tolist()
        def average(key: str) -> float:  # NaN when every micro-batch was skipped
            return totals.get(key, math.nan) / max(num_micro_batches, 1)

        local = {
            "objective/entropy": average("entropy"),
            "losses/policy_loss": average("policy_loss"),
            "losses/value_loss": average("value_loss"),
            "losses/kl_loss": average("kl_loss"),
            "losses/approx_kl": average("approx_kl"),
            "losses/clipfrac": average("clipfrac"),
            "losses/value_clipfrac": average("value_clipfrac"),
            "losses/grad_norm": totals.get("grad_norm", 0.0) / max(num_optimizer_steps, 1),
            "losses/explained_variance": float(explained_variance(batch["values"], returns, mask).nan_to_num(0.0)),
            "objective/reward": float(batch["rewards"].mean()),
            "objective/advantage_mean": float(masked_mean(raw_advantages, mask)),
            "perf/rollout_s": rollout_time,
            "perf/update_s": update_time,
        }
        reduced = accelerator.reduce(torch.tensor(list(local.values()), dtype=torch.float64, device=device), "mean").tolist()
        metrics = dict(zip(local, reduced))
        num_episodes, iteration_time = sums[0], rollout_time + update_time
        trainer_state["env_steps"] += int(sums[6])
        trainer_state["episodes"] += int(num_episodes)
        metrics.update({
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_controller.value,
            "losses/skipped_updates": guard.skipped,
            "charts/invalid_rate": sums[5] / sums[6],
            "charts/env_steps": trainer_state["env_steps"],
            "perf/env_steps_per_s": sums[6] / iteration_time,
            "perf/generated_tokens_per_s": sums[7] / max(rollout_time, 1e-9),
            "perf/tokens_per_s": sums[8] / max(update_time, 1e-9),
        })
        if num_episodes:
            metrics.update({
                "charts/episodic_return": sums[1] / num_episodes,
                "charts/normalized_score": sums[2] / num_episodes,
                "charts/win_rate": sums[3] / num_episodes,
                "charts/episode_length": sums[4] / num_episodes,
            })
        rows = rollout_rows(turns, iteration, rank, raw_advantages, returns, kl, mask)
        all_rows = gather_object(rows)
        if accelerator.is_main_process:
            save_rollouts(all_rows, output_dir, iteration)

        # ---- periodic evaluation and checkpoint
        trainer_state["iteration"] = iteration
        trainer_state["kl_controller"] = kl_controller.state_dict()
        last = iteration == run.num_iterations
        if run.eval_every and iteration % run.eval_every == 0 and not last:
            started = time.time()
            with gathered_for_evaluation(model, zero3), accelerator.autocast():
                report = run_evaluation(
                    accelerator, greedy_agent, eval_games, run.eval_episodes, run.num_envs, run.max_episode_turns,
                    prompt_config(rollout_args), tokenizer, run.seed,
                )
            metrics.update(eval_metrics(report))
            metrics["perf/eval_s"] = time.time() - started
            record_evaluation(report)
        accelerator.log(metrics, step=iteration)
        bar.set_postfix({
            "reward": f"{metrics['objective/reward']:.3f}",
            "return": f"{metrics.get('charts/episodic_return', float('nan')):.2f}",
            "win": f"{metrics.get('charts/win_rate', float('nan')):.2f}",
            "kl": f"{mean_kl:.3f}",
            "pg": f"{metrics['losses/policy_loss']:.3f}",
            "sps": f"{metrics['perf/env_steps_per_s']:.2f}",
        })
        if run.save_every and iteration % run.save_every == 0 and not last:
            trainer_state["wall_time_s"] = wall_time_before + time.time() - run_started
            checkpoint = save_checkpoint(
                accelerator, model, tokenizer, output_dir, iteration, trainer_state,
                model_card(run, iteration, evals, rollout_args.action_mode), arguments, run.save_total_limit,
                {"rollout": collector.state_dict()},
            )
    bar.close()
    env.close()

    # ---- final evaluation, model, checkpoint, hub
    started = time.time()
    with gathered_for_evaluation(model, zero3), accelerator.autocast():
        evals["after"] = run_evaluation(
            accelerator, greedy_agent, eval_games, run.eval_episodes, run.num_envs, run.max_episode_turns,
            prompt_config(rollout_args), tokenizer, run.seed,
        )
    accelerator.log({**eval_metrics(evals["after"]), "perf/eval_s": time.time() - started}, step=run.num_iterations)
    record_evaluation(evals["after"])
    trainer_state["wall_time_s"] = wall_time_before + time.time() - run_started
    card = model_card(run, run.num_iterations, evals, rollout_args.action_mode)
    checkpoint = save_checkpoint(
        accelerator, model, tokenizer, output_dir, trainer_state["iteration"], trainer_state, card, arguments,
        run.save_total_limit, {"rollout": collector.state_dict()},
    )
    save_final_model(accelerator, model, tokenizer, output_dir, card, arguments)
    if run.push_to_hub and accelerator.is_main_process:
        push_to_hub(run.push_to_hub, output_dir, load_rollouts(output_dir))
    accelerator.print(
        f"held-out eval on {run.eval_games} ({run.eval_episodes} episodes, greedy):\n"
        f"  random-admissible: {describe(evals.get('random'))}\n"
        f"  before training:   {describe(evals.get('before'))}\n"
        f"  after training:    {describe(evals.get('after'))}\n"
        f"model: {output_dir} (checkpoint: {checkpoint})"
    )
    accelerator.end_training()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except NonFiniteError as error:  # raised on every process alike; the checkpoints written so far stay as they are
        sys.exit(f"error: {error}")
