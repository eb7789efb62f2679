"""Training throughput of --context window against --context episode, with and without the shared trunk
(lib/trunk.py, --share_trunk): PPO iterations (rollout + update) of the quick-start configuration on the same games
and seeds, at short and long episodes.

    python bench/bench_context.py                              # both settings, both contexts (~30 min on 2 cores)
    python bench/bench_context.py --settings quick --iterations 1

Runs per setting: `window-whole` (--share_trunk false: the policy and the reference each read every token, and the
update encodes from the embeddings: how the project trained before the shared trunk), `window` and `episode` (the
shared trunk). Each (setting, run) runs in its own child process (so peak RSS is its own), one after another within one run:
`iterations` PPO iterations of ppo_textworld.py's default flags (score mode, 8 slots, 8 turns per slot, the default
model), after one untimed warm-up turn, with the script's own collate / advantages_and_returns / ppo_update and loss
functions; no evaluation. Settings: `quick` plays the quick start's games (`default`, 12-turn episodes); `long`
plays level-15 coin collector games with 50-turn episodes.

Reported per run: rollout env steps/s, update seconds per env step, end-to-end training env steps/s, prompt tokens
the policy encoded per env step (window: each turn's prompt; episode: each turn's new stream tokens and the reply the
cache did not hold) and candidate tokens per env step, peak RSS (GiB). The last line printed is one JSON object with
the ratios of end-to-end env steps/s per setting against window-whole (goals for episode: >= 2 at quick, >= 3 at
long; RSS <= 4 GiB).
"""

import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ppo_textworld  # noqa: E402
from lib.arguments import RolloutArguments, prompt_config, reward_config, scoring_config  # noqa: E402
from lib.env import BatchEnv  # noqa: E402
from lib.games import default_cache_dir, resolve_games  # noqa: E402
from lib.losses import FixedKLController  # noqa: E402
from lib.models import DEFAULT_MODEL, freeze_lower_layers, load_model, load_tokenizer  # noqa: E402
from lib.rewards import reward_chain  # noqa: E402
from lib.rollout import ScoringRolloutCollector  # noqa: E402
from lib.training import NonFiniteGuard  # noqa: E402
from lib.value_head import PolicyWithValue, ValueHead  # noqa: E402

SETTINGS = {  # name -> (games, max_episode_turns)
    "quick": ("default", 12),
    "long": ("tw-coin_collector:level=15:n=8", 50),
}
GOALS = {"quick": 2.0, "long": 3.0}
RUNS = {"window-whole": ("window", False), "window": ("window", True), "episode": ("episode", True)}  # context, trunk
RSS_GOAL_GIB = 4.0


@dataclass
class BenchArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Policy (and reference) model."})
    settings: str = field(default="quick,long", metadata={"help": f"Comma list of {', '.join(SETTINGS)}."})
    iterations: int = field(default=2, metadata={"help": "Timed PPO iterations per run."})
    max_context_tokens: int = field(default=RolloutArguments.max_context_tokens, metadata={"help": "Episode context's stream limit."})
    one: str | None = field(default=None, metadata={"help": "Internal: run only SETTING:RUN in this process."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)."})


def encoded_tokens(turns, episode: bool) -> tuple[int, int]:
    """(prompt tokens, candidate tokens) the policy encoded for these turns."""
    prompt = candidates = 0
    for turn in turns:
        prompt += len(turn.prompt_ids)
        candidates += sum(map(len, turn.candidate_ids))
    if episode:  # each reply joins the stream with the next turn's tokens
        prompt += sum(len(turn.response_ids) for turn in turns)
    return prompt, candidates


def run_one(setting: str, name: str, args: BenchArguments) -> dict:
    from accelerate import Accelerator

    from lib.trunk import share_trunk

    torch.manual_seed(0)
    games_spec, max_episode_turns = SETTINGS[setting]
    context, shared = RUNS[name]
    games = resolve_games(games_spec, "train", default_cache_dir(), progress=False)
    run = ppo_textworld.PPORunArguments()
    ppo = ppo_textworld.PPOArguments()
    rollout_args = RolloutArguments(context=context, max_context_tokens=args.max_context_tokens)
    tokenizer = load_tokenizer(args.model_name_or_path)
    policy = load_model(args.model_name_or_path)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    freeze_lower_layers(policy, run.trainable_layers_fraction)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size)).eval()
    trunk_layers = share_trunk(policy, ref_model) if shared else 0
    accelerator = Accelerator(gradient_accumulation_steps=ppo.gradient_accumulation_steps, cpu=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=ppo.learning_rate))
    guard = NonFiniteGuard(accelerator, run.max_nonfinite_updates)
    episode = context == "episode"
    options = {"ppo": ppo, "temperature": rollout_args.temperature, "pad_id": tokenizer.pad_token_id, "device": "cpu",
               "length_normalize": rollout_args.length_normalize, "ref_model": ref_model, "trunk_layers": trunk_layers}
    loss_fn = partial(ppo_textworld.stream_turn_loss if episode else ppo_textworld.turn_level_loss, **options)
    rollout_s = update_s = steps = prompt_tokens = candidate_tokens = update_tokens = 0
    with BatchEnv(games, run.num_envs, max_episode_turns, shuffle=True, seed=0) as env:
        collector = ScoringRolloutCollector(
            env, tokenizer, prompt_config(rollout_args), scoring_config(rollout_args),
            reward_chain(reward_config(rollout_args)), max_context_tokens=args.max_context_tokens if episode else None,
        )
        collector.collect(model, ref_model, 1)  # warm-up
        kl = FixedKLController(ppo.kl_coef)
        for iteration in range(args.iterations):
            started = time.perf_counter()
            rollout = collector.collect(model, ref_model, run.turns_per_slot)
            rollout_s += time.perf_counter() - started
            turns = rollout.transitions
            started = time.perf_counter()
            batch = ppo_textworld.collate_decisions(turns)
            _, advantages, _, returns = ppo_textworld.advantages_and_returns(
                turns, batch, ppo_textworld.turn_level_gae, kl.value, ppo)
            model.train()
            _, tokens = ppo_textworld.ppo_update(
                accelerator, model, optimizer, guard, loss_fn, turns, batch, advantages, returns, ppo=ppo,
                parameters=trainable, where=f"iteration {iteration}",
                units=ppo_textworld.stream_units(turns) if episode else None,
            )
            model.eval()
            update_s += time.perf_counter() - started
            steps += len(turns)
            update_tokens += tokens
            prompt, candidates = encoded_tokens(turns, episode)
            prompt_tokens += prompt
            candidate_tokens += candidates
    return {
        "setting": setting, "run": name, "context": context, "trunk_layers": trunk_layers, "env_steps": steps,
        "rollout_env_steps_per_s": steps / rollout_s,
        "update_s_per_env_step": update_s / steps,
        "train_env_steps_per_s": steps / (rollout_s + update_s),
        "prompt_tokens_per_env_step": prompt_tokens / steps,
        "candidate_tokens_per_env_step": candidate_tokens / steps,
        "update_tokens_per_env_step": update_tokens / steps,
        # ru_maxrss is in KiB on Linux; this process's own peak (its game workers are separate processes)
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.one:
        setting, name = args.one.split(":")
        print(json.dumps(run_one(setting, name, args)))
        return
    settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or args.iterations < 1:
        sys.exit(f"error: --settings takes {', '.join(SETTINGS)} (got {', '.join(unknown)}) and --iterations >= 1")
    runs, summary = [], {"bench": "context", "threads": torch.get_num_threads(), "iterations": args.iterations,
                         "max_context_tokens": args.max_context_tokens}
    for setting in settings:
        for name in RUNS:
            command = [sys.executable, __file__, "--one", f"{setting}:{name}", "--iterations", str(args.iterations),
                       "--model_name_or_path", args.model_name_or_path, "--max_context_tokens",
                       str(args.max_context_tokens), "--threads", str(args.threads)]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: the {setting}:{name} run failed:\n{result.stderr[-3000:]}")
            run = json.loads(result.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{setting:6s} {name:12s} rollout {run['rollout_env_steps_per_s']:.2f} steps/s, update "
                  f"{run['update_s_per_env_step']:.2f} s/step, training {run['train_env_steps_per_s']:.3f} steps/s, "
                  f"{run['prompt_tokens_per_env_step']:.0f} prompt + {run['candidate_tokens_per_env_step']:.0f} "
                  f"candidate tokens/step, peak RSS {run['peak_rss_gib']:.2f} GiB", flush=True)
        whole, window, episode = runs[-3:]
        for label, run in (("window", window), ("episode", episode)):  # against how the project trained before
            summary[f"{setting}_{label}_speedup"] = run["train_env_steps_per_s"] / whole["train_env_steps_per_s"]
            summary[f"{setting}_{label}_rollout_speedup"] = run["rollout_env_steps_per_s"] / whole["rollout_env_steps_per_s"]
            summary[f"{setting}_{label}_update_speedup"] = whole["update_s_per_env_step"] / run["update_s_per_env_step"]
        summary[f"{setting}_speedup_goal"] = GOALS[setting]
        summary[f"{setting}_episode_peak_rss_gib"] = episode["peak_rss_gib"]
    summary["rss_goal_gib"] = RSS_GOAL_GIB
    summary["runs"] = runs
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
