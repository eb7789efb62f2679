"""Environment throughput: a random agent's env steps per second with 1 game slot versus many in one BatchEnv.

    python bench/bench_env.py
    python bench/bench_env.py --steps 2000 --num_envs_many 32
    python bench/bench_env.py --profile          # cProfile of the parent's loop in the many-slot run
    python bench/bench_env.py --games "default;twx;sciworld-easy"   # each engine's speed, one source after another

Each setting first plays `warmup_steps_per_slot` steps in every slot, then times `steps` steps (a step = one command
in one slot). The warm-up keeps start-up costs out of the timing: starting the worker processes, and each process's
first load of a game kind (TextWorld parses the game's logic once per process, 0.2-1.5 s). The last line printed is
one JSON object for scripts, with the ratio of the two speeds and the `goal` ratio (of the first source when --games
lists several, separated by `;`: `sources` then holds every source's speeds and engines). The env is CPU-bound
(TextWorld's own command processing, mostly admissible-command generation; the Java engines' simulation), so the ratio
cannot exceed the number of cores by much.
"""

import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.agents import RandomAgent  # noqa: E402
from lib.engines import engine_of  # noqa: E402
from lib.env import BatchEnv  # noqa: E402
from lib.games import default_cache_dir, resolve_games  # noqa: E402

PROFILE_LINES = 25


@dataclass
class Args:
    games: str = field(
        default="default", metadata={"help": "game source (see lib/games.py); several separated by ';' are timed apart"}
    )
    split: str = field(default="eval", metadata={"help": "split of the game source: eval or train"})
    steps: int = field(default=800, metadata={"help": "env steps timed per setting"})
    warmup_steps_per_slot: int = field(
        default=100, metadata={"help": "env steps per slot played before the timing starts (100: two full episodes)"}
    )
    num_envs_many: int = field(default=16, metadata={"help": "slots of the batched setting (the other has 1)"})
    max_episode_turns: int = field(default=50, metadata={"help": "commands per episode before it is cut off"})
    seed: int = field(default=0, metadata={"help": "seed of the random agent"})
    goal: float = field(default=8.0, metadata={"help": "the speed-up (many slots / one slot) we aim for"})
    profile: bool = field(default=False, metadata={"help": "print a cProfile of the parent loop in the batched run"})
    games_dir: str = field(default_factory=lambda: str(default_cache_dir()), metadata={"help": "generated games cache"})


def play(env: BatchEnv, agent: RandomAgent, states: list, steps: int) -> tuple[list, int]:
    """Step every active slot until `steps` steps are done; returns the states to go on from and the steps done."""
    done = 0
    while done < steps:
        results = env.step(agent.act(states, [None] * len(states)))
        states = [result.next_state for result in results]
        done += sum(result is not None for result in results)
    return states, done


def measure(games: list[str], num_envs: int, args: Args, profile: bool) -> tuple[float, str]:
    """Env steps per second with `num_envs` slots, and the profile of the timed loop when asked for."""
    agent = RandomAgent(args.seed)
    profiler = cProfile.Profile()
    with BatchEnv(games, num_envs, args.max_episode_turns, shuffle=True, seed=args.seed) as env:
        states, _ = play(env, agent, env.reset(), args.warmup_steps_per_slot * num_envs)
        start = time.perf_counter()
        with profiler if profile else contextlib.nullcontext():
            _, done = play(env, agent, states, args.steps)
        elapsed = time.perf_counter() - start
    if not profile:
        return done / elapsed, ""
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(PROFILE_LINES)
    return done / elapsed, text.getvalue()


def main() -> None:
    parser = HfArgumentParser(Args)
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        args = parser.parse_yaml_file(sys.argv[1])[0]
    else:
        args = parser.parse_args_into_dataclasses()[0]
    for flag in ("steps", "num_envs_many", "max_episode_turns", "warmup_steps_per_slot"):
        if getattr(args, flag) < (0 if flag == "warmup_steps_per_slot" else 1):
            print(f"error: --{flag} is too small: {getattr(args, flag)}", file=sys.stderr)
            sys.exit(2)
    sources = {}
    for source in [part.strip() for part in args.games.split(";") if part.strip()]:
        games = resolve_games(source, args.split, args.games_dir)
        engines = sorted({engine_of(game) for game in games})
        speeds = {}
        for num_envs in (1, args.num_envs_many):
            speeds[num_envs], profile = measure(games, num_envs, args, args.profile and num_envs > 1)
            print(f"{source} ({', '.join(engines)}): {num_envs:3d} slot(s) on {len(games)} games: "
                  f"{speeds[num_envs]:7.1f} env steps/s ({args.steps} steps after {args.warmup_steps_per_slot} "
                  "warm-up steps per slot)")
            if profile:
                print(profile)
        sources[source] = {"engines": engines, "steps_per_s_1": round(speeds[1], 2),
                           f"steps_per_s_{args.num_envs_many}": round(speeds[args.num_envs_many], 2),
                           "ratio": round(speeds[args.num_envs_many] / speeds[1], 2)}
    first = next(iter(sources.values()))
    print(json.dumps({
        "bench": "env",
        **{key: value for key, value in first.items() if key != "engines"},
        "goal": args.goal,
        "cpu_count": os.cpu_count(),
        **({"sources": sources} if len(sources) > 1 else {}),
    }))


if __name__ == "__main__":
    main()
