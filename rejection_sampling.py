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
     policy, sampling, with PPO's prompts and rewards (the same RolloutArguments; REWARD_FN below); each process plays the
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
turn, kept or not (lib.rollout.load_rollouts(output_dir, prefix="round")): round, process, game, env, episode, turn,
prompt, response, command, reward (reward_fn), return (the episode's return, or the turn's return-to-go), kl (of
the turn, 0 without --rank_kl_coef), objective (the value ranked), rank (1 = best; a turn has its episode's rank
when ranking episodes), kept, won (the episode was won); runs/ tracker logs.
"""

import math
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object

from lib.agents import ModelAgent, ScoringAgent
from lib.arguments import (
    RolloutArguments,
    generation_config,
    prompt_config,
    reward_config,
    scoring_config,
)
from lib.evaluation import merge_reports
from lib.games import stages
from lib.losses import KL_DIRECTIONS, exact_kl, masked_sum, sft_loss
from lib.prompts import answer_text
from lib.rewards import reward_chain
from lib.rollout import load_rollouts, play_episodes, save_rollouts
from lib.selection import Selection, returns_to_go, select
from lib.sequences import model_inputs, pack_sequences, response_logits
from lib.training import (
    RunArguments,
    RunningMeans,
    TrainingRun,
    backward_and_step,
    build_optimizer,
    gathered_for_evaluation,
    load_models_or_exit,
    main_or_exit,
    model_card,
    parse_or_exit,
)

RANK_BY = ("episode", "turn")
DEFAULT_KEEP_TOP_PERCENT = 25.0
ROUND_PREFIX = "round"
# The dataset's columns after `round` (see the module docstring).
ROW_COLUMNS = ("process", "game", "env", "episode", "turn", "prompt", "response", "command", "reward", "return", "kl",
               "objective", "rank", "kept", "won")
# Seeds the shuffle of each round's fine-tuning pairs: the same on every process, which take slices of one order.
SHUFFLE_SEED_STRIDE = 1_000_003


@dataclass
class RSRunArguments(RunArguments):
    output_dir: str = field(default="outputs/rejection_sampling", metadata={"help": "Where the final model, checkpoints, played turns and logs go."})
    num_rounds: int = field(default=4, metadata={"help": "Rounds of play, select, fine-tune."})
    episodes_per_round: int = field(default=16, metadata={"help": "Episodes played per round, in total over all processes."})


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


ALL_ARGUMENTS = (RSRunArguments, SelectionArguments, FinetuneArguments, RolloutArguments)

# A turn's reward: lib.rewards.reward_chain of the --reward flags by default, or any function of a
# lib.rewards.TurnOutcome (see ppo_textworld.py's REWARD_FN for an example).
REWARD_FN = None


def check_arguments(run: RSRunArguments, selection: SelectionArguments, finetune: FinetuneArguments,
                    rollout: RolloutArguments, world_size: int) -> None:
    """Raise ValueError naming the flag for every bad value or combination of rejection sampling's own flags
    (parse_or_exit checks the shared ones first); builds nothing heavy."""
    positive = {
        "num_rounds": run.num_rounds, "episodes_per_round": run.episodes_per_round,
        "num_train_epochs": finetune.num_train_epochs, "learning_rate": finetune.learning_rate,
        "train_batch_size": finetune.train_batch_size, "gradient_accumulation_steps": finetune.gradient_accumulation_steps,
        "max_grad_norm": finetune.max_grad_norm,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ValueError(f"--{name} must be positive, got {value}")
    if len(stages(run.train_games)) > 1:
        raise ValueError("--train_games: curriculum stages ('>') are ppo_textworld.py's; rejection sampling trains on "
                         "one game source (a mixture is fine: SOURCE@WEIGHT,SOURCE@WEIGHT)")
    if rollout.context != "window":
        raise ValueError("--context episode is ppo_textworld.py's: rejection sampling fine-tunes on each chosen turn "
                         "with its window prompt; drop the flag (play.py plays either way)")
    for name, value in (("kl_coef", finetune.kl_coef), ("rank_kl_coef", selection.rank_kl_coef)):
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
    if run.episodes_per_round < world_size:
        raise ValueError(f"--episodes_per_round {run.episodes_per_round} is below the number of processes ({world_size}): every process plays")
    if finetune.train_batch_size % (world_size * finetune.gradient_accumulation_steps):
        raise ValueError(
            f"--train_batch_size {finetune.train_batch_size} must be divisible by the number of processes ({world_size}) "
            f"times --gradient_accumulation_steps {finetune.gradient_accumulation_steps}"
        )


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
        inputs = model_inputs(packed, device)
        logits = response_logits(policy, *inputs, packed["start"], packed["end"]).float()
        ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float()
        kls += masked_sum(exact_kl(logits, ref_logits, direction=direction), packed["response_mask"].to(device), dim=1).tolist()
    return kls


def rank_turns(turns: list[dict], rules: SelectionArguments) -> tuple[Selection, list[float]]:
    """Set return, won (the episode's), objective, rank and kept on every turn (all processes' turns, sorted by
    episode and turn); returns the Selection (one entry per candidate) and the return of every episode. The
    objective ranked: return - rank_kl_coef * the KL of the turns the candidate would train on."""
    episodes: dict[int, list[dict]] = {}
    for turn in turns:
        episodes.setdefault(turn["episode"], []).append(turn)
    episode_returns = []
    for episode in episodes.values():
        rewards = [t["reward"] for t in episode]
        episode_returns.append(sum(rewards))
        for turn, to_go in zip(episode, returns_to_go(rewards, rules.gamma)):
            turn["return"] = episode_returns[-1] if rules.rank_by == "episode" else to_go
            turn["won"] = episode[-1]["won"]
    if rules.rank_by == "episode":
        candidates = list(episodes.values())
    else:
        candidates = [[turn] for turn in turns]
    values = [group[0]["return"] - rules.rank_kl_coef * sum(t["kl"] for t in group) for group in candidates]
    selection = select(values, rules.keep_top_percent, rules.keep_top_n, rules.min_return)
    for group, value, rank, kept in zip(candidates, values, selection.ranks, selection.kept):
        for turn in group:
            turn.update(objective=value, rank=rank, kept=kept)
    return selection, episode_returns


def main(argv: list[str]) -> None:
    (run, rules, finetune, rollout_args), arguments, resume_folder = parse_or_exit(
        ALL_ARGUMENTS, argv, check_arguments, "round", "num_rounds"
    )
    started = time.time()
    # The reference is built only when a KL term needs it (it costs a model's memory).
    tokenizer, model, ref_model = load_models_or_exit(run, prompt_config(rollout_args),
                                                      with_reference=finetune.kl_coef > 0 or rules.rank_kl_coef > 0)

    training = TrainingRun(run, arguments, resume_folder, "round", finetune.gradient_accumulation_steps, started)
    accelerator, device, pad_id = training.accelerator, training.accelerator.device, tokenizer.pad_token_id
    process_index, num_processes = training.process_index, training.num_processes
    process_batch_size = finetune.train_batch_size // num_processes  # pairs per optimizer step on this process
    micro_batch_size = process_batch_size // finetune.gradient_accumulation_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(accelerator, trainable, finetune.learning_rate, micro_batch_size,
                                finetune.gradient_accumulation_steps, finetune.max_grad_norm)
    model, optimizer, ref_model = training.prepare(model, optimizer, ref_model)
    start_round = training.resume(optimizer)

    unwrapped = accelerator.unwrap_model(model)
    prompts, reward_fn = prompt_config(rollout_args), REWARD_FN or reward_chain(reward_config(rollout_args))
    if rollout_args.action_mode == "score":
        sampling_agent = ScoringAgent(unwrapped, tokenizer, prompts, scoring_config(rollout_args))
        greedy_agent = ScoringAgent(unwrapped, tokenizer, prompts, scoring_config(rollout_args, greedy=True))
    else:
        sampling_agent = ModelAgent(unwrapped, tokenizer, generation_config(rollout_args))
        greedy_agent = ModelAgent(unwrapped, tokenizer, generation_config(rollout_args, greedy=True))
    slots = max(1, run.num_envs // num_processes)

    def card(round_: int) -> str:
        return model_card(
            run, title=f"Rejection sampling on TextWorld ({round_} rounds)", tags=["rejection-sampling", "expert-iteration"],
            description=f"Fine-tuned from `{run.model_name_or_path}` with `rejection_sampling.py` (--action_mode "
                        f"{rollout_args.action_mode}) on games `{run.train_games}`: each round plays episodes with the "
                        "policy, keeps the best and fine-tunes on their commands.",
            evals=training.evals, action_mode=rollout_args.action_mode, held_out=training.held_out,
        )

    training.evaluate_baselines(greedy_agent, model, prompts, tokenizer)  # random-admissible and before training

    bar = training.progress_bar(start_round, run.num_rounds, "rejection sampling")
    checkpoint = None
    for round_ in bar:
        # ---- 1. play whole episodes with the sampling policy
        started = time.time()
        with gathered_for_evaluation(model, training.zero3), accelerator.autocast():
            turns, play_report = play_episodes(
                sampling_agent, training.train_games, run.episodes_per_round, slots, run.training_episode_turns(),
                prompts, tokenizer, reward_fn, run.seed, process_index, num_processes,
            )
        play_time = time.time() - started
        for turn in turns:
            turn["process"] = process_index
        encode_pairs(turns, tokenizer, rollout_args)

        # ---- 2. rank and keep, over the turns of all processes
        turns = sorted(gather_object(turns), key=lambda t: (t["episode"], t["turn"]))
        if rules.rank_kl_coef > 0:
            # Each process scores an equal slice of all turns (padded with its last one), so that the reference's
            # forward calls pair up across processes under ZeRO-3; the KLs are then gathered back.
            mine = list(range(process_index, len(turns), num_processes))
            padded = mine + mine[-1:] * (math.ceil(len(turns) / num_processes) - len(mine))
            with gathered_for_evaluation(model, training.zero3), accelerator.autocast():
                kls = answer_kls(unwrapped, ref_model, [turns[i] for i in padded], pad_id, micro_batch_size,
                                 finetune.kl_direction, device)
            for index, kl in gather_object(list(zip(mine, kls))):
                turns[index]["kl"] = kl
        else:
            for turn in turns:
                turn["kl"] = 0.0
        selection, episode_returns = rank_turns(turns, rules)
        kept = [turn for turn in turns if turn["kept"]]
        if selection.note and accelerator.is_main_process:
            bar.write(f"round {round_}: {selection.note}")
        rows = [{"round": round_, **{key: turn[key] for key in ROW_COLUMNS}} for turn in turns]
        if accelerator.is_main_process:
            save_rollouts(rows, run.output_dir, round_, prefix=ROUND_PREFIX)

        # ---- 3. fine-tune on the kept (prompt, command) pairs
        figures, train_tokens, train_time = RunningMeans(), 0, 0.0
        if not kept:
            if accelerator.is_main_process:
                bar.write(f"round {round_}: kept none of {len(selection.ranks)} {rules.rank_by}s; no fine-tuning this round")
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
                for optimizer_step in range(steps_per_epoch):
                    batch = order[optimizer_step * finetune.train_batch_size : (optimizer_step + 1) * finetune.train_batch_size]
                    mine = batch[process_index::num_processes]
                    for micro_start in range(0, process_batch_size, micro_batch_size):
                        pairs = [kept[i] for i in mine[micro_start : micro_start + micro_batch_size]]
                        packed = pack_sequences([t["prompt_ids"] for t in pairs], [t["answer_ids"] for t in pairs], pad_id)
                        inputs = model_inputs(packed, device)
                        train_tokens += int(packed["attention_mask"].sum())
                        with accelerator.accumulate(model):
                            logits = response_logits(model, *inputs, packed["start"], packed["end"]).float()
                            ref_logits = None
                            if finetune.kl_coef > 0:
                                with torch.no_grad():
                                    ref_logits = response_logits(ref_model, *inputs, packed["start"], packed["end"]).float()
                            loss, stats = sft_loss(
                                logits, packed["response_ids"].to(device), packed["response_mask"].to(device), ref_logits,
                                kl_coef=finetune.kl_coef, kl_direction=finetune.kl_direction,
                            )
                            finite, stepped, grad_norm = backward_and_step(
                                accelerator, training.guard, loss, optimizer, trainable, finetune.max_grad_norm,
                                f"round {round_}",
                            )
                        if finite:
                            figures.add(stats)
                        if stepped:
                            figures.add({"grad_norm": grad_norm or 0.0})
            model.eval()
            train_time = time.time() - started

        # ---- 4. metrics, held-out evaluation, checkpoint
        play_report = merge_reports(gather_object([play_report]))
        training.state["round"] = round_
        training.state["env_steps"] += len(turns)
        training.state["episodes"] += len(episode_returns)
        metrics = {
            "charts/episodic_return": sum(episode_returns) / len(episode_returns),
            "charts/normalized_score": play_report["normalized_score"],
            "charts/win_rate": play_report["win_rate"],
            "charts/episode_length": play_report["mean_steps"],
            "charts/invalid_rate": play_report["invalid_rate"],
            "charts/env_steps": training.state["env_steps"],
            "selection/candidates": len(selection.ranks),
            "selection/kept": selection.num_kept,
            "selection/kept_pairs": len(kept),
            "selection/objective_mean": sum(t["objective"] for t in turns) / len(turns),
            "perf/play_s": play_time,
            "perf/env_steps_per_s": len(turns) / max(play_time, 1e-9),
            "losses/skipped_updates": training.guard.skipped,
        }
        if kept:
            metrics["selection/kept_objective_mean"] = sum(t["objective"] for t in kept) / len(kept)
            local = {f"losses/{key}": figures.mean(key) for key in figures.sums if key != "grad_norm"}
            local["losses/grad_norm"] = figures.mean("grad_norm") if figures.counts.get("grad_norm") else 0.0
            local["perf/train_s"] = train_time
            local["perf/tokens_per_s"] = train_tokens / max(train_time, 1e-9)
            metrics.update(training.reduce(local, "mean"))
        metrics.update(training.evaluate_held_out(greedy_agent, model, prompts, tokenizer, f"round {round_}"))
        training.log(metrics, step=round_)
        bar.set_postfix({
            "return": f"{metrics['charts/episodic_return']:.2f}",
            "kept": f"{selection.num_kept}/{len(selection.ranks)}",
            "nll": f"{metrics.get('losses/nll', math.nan):.3f}",
            "eval": f"{metrics.get('eval/normalized_score', math.nan):.3f}",
        })
        checkpoint = training.save_checkpoint(model, tokenizer, card(round_))
    bar.close()

    # ---- final model, hub, summary
    training.finish(model, tokenizer, card(run.num_rounds), checkpoint,
                    lambda: load_rollouts(run.output_dir, prefix=ROUND_PREFIX))


if __name__ == "__main__":
    main_or_exit(main)
