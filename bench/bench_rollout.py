"""Rollout throughput of PPO's collectors, generate and score modes, with ppo_textworld.py's default flags.

    python bench/bench_rollout.py                      # SmolLM2-135M, default games, 8 slots, 4 timed steps per mode
    python bench/bench_rollout.py --turns_per_slot 8

Each mode plays with the policy (PolicyWithValue) and the frozen reference exactly as a PPO iteration does
(lib.rollout.RolloutCollector / ScoringRolloutCollector.collect: prompts, generation or candidate scoring, the
policy+value and reference forwards, the env steps): one untimed step warms up, then `turns_per_slot` timed steps.
Reported per mode: env steps per second, and tokens per second the policy read (prompt + response tokens; score mode:
prompt + every candidate's tokens); generate mode also its generated tokens per second. The last line printed is one
JSON object for scripts.
"""

import copy
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.arguments import RolloutArguments, generation_config, prompt_config, reward_config, scoring_config  # noqa: E402
from lib.env import BatchEnv  # noqa: E402
from lib.games import default_cache_dir, resolve_games  # noqa: E402
from lib.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from lib.rewards import reward_chain  # noqa: E402
from lib.rollout import RolloutCollector, ScoringRolloutCollector  # noqa: E402
from lib.value_head import PolicyWithValue, ValueHead  # noqa: E402


@dataclass
class BenchArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy (and reference) model."})
    games: str = field(default="default", metadata={"help": "Game source (lib/games.py); its train split is played."})
    num_envs: int = field(default=8, metadata={"help": "Game slots (ppo_textworld.py's default)."})
    turns_per_slot: int = field(default=4, metadata={"help": "Timed turns per slot and mode (after one warm-up turn)."})
    max_episode_turns: int = field(default=12, metadata={"help": "Step limit of an episode (ppo_textworld.py's default)."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)."})


def read_tokens(turns) -> int:
    total = 0
    for turn in turns:
        answers = turn.candidate_ids if turn.candidate_ids is not None else [turn.response_ids]
        total += len(turn.prompt_ids) + sum(map(len, answers))
    return total


def bench_mode(mode: str, model, ref_model, tokenizer, games: list[str], args: BenchArguments) -> dict:
    rollout_args = RolloutArguments(action_mode=mode)
    with BatchEnv(games, args.num_envs, args.max_episode_turns, shuffle=True, seed=0) as env:
        if mode == "score":
            collector = ScoringRolloutCollector(
                env, tokenizer, prompt_config(rollout_args), scoring_config(rollout_args), reward_chain(reward_config(rollout_args))
            )
        else:
            collector = RolloutCollector(
                env, tokenizer, prompt_config(rollout_args), generation_config(rollout_args), reward_chain(reward_config(rollout_args))
            )
        collector.collect(model, ref_model, 1)
        started = time.perf_counter()
        rollout = collector.collect(model, ref_model, args.turns_per_slot)
        seconds = time.perf_counter() - started
    turns = rollout.transitions
    result = {
        f"{mode}_env_steps_per_s": round(len(turns) / seconds, 3),
        f"{mode}_tokens_per_s": round(read_tokens(turns) / seconds, 1),
        f"{mode}_rollout_s": round(seconds, 2),
    }
    if mode == "generate":
        result["generate_generated_tokens_per_s"] = round(rollout.generated_tokens / seconds, 2)
    print(f"{mode}: {len(turns)} env steps in {seconds:.1f} s = {len(turns) / seconds:.2f} steps/s, "
          f"{read_tokens(turns) / seconds:.0f} tokens/s read by the policy")
    return result


def main() -> None:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    for flag in ("num_envs", "turns_per_slot", "max_episode_turns"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    games = resolve_games(args.games, "train", default_cache_dir(), progress=False)
    tokenizer = load_tokenizer(args.model_name_or_path)
    policy = load_model(args.model_name_or_path)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size)).eval()
    result = {"bench": "rollout", "num_envs": args.num_envs, "threads": torch.get_num_threads()}
    for mode in ("generate", "score"):
        result.update(bench_mode(mode, model, ref_model, tokenizer, games, args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
