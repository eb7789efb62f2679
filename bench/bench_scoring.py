"""Admissible-command scoring time: the prompt's KV cache shared by its candidates versus every candidate encoded
from scratch with its prompt.

    python bench/bench_scoring.py                      # SmolLM2-135M, 4 cooking states of 17-30 candidates
    python bench/bench_scoring.py --num_states 8 --repeats 3

The states are real: a random agent plays `random_steps` commands in each of `num_states` games (cooking games
by default: a kitchen full of objects, 17-35 admissible commands, examine ones included), then the prompts are built
as play.py builds them (default PromptConfig, this episode's turns as memory). Both methods score the same token ids
(lib.scoring.candidate_logprobs and candidate_logprobs_naive, each one batched call for all the states): one
untimed call of the cached method warms up, then `repeats` rounds time one call of each, alternating, so that load
from other processes hits both alike; the median of each is reported. The scores of the two methods must agree: the
largest absolute difference is printed. The last line printed is one JSON object for scripts, with both times,
their ratio (naive / cached) and the `goal` ratio.
"""

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.agents import RandomAgent, candidate_commands  # noqa: E402
from lib.env import BatchEnv  # noqa: E402
from lib.games import default_cache_dir, resolve_games  # noqa: E402
from lib.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from lib.prompts import PromptConfig, Turn, build_prompt, clean_observation  # noqa: E402
from lib.scoring import candidate_logprobs, candidate_logprobs_naive, encode_candidates  # noqa: E402


@dataclass
class Args:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "model to score with"})
    games: str = field(default="tw-cooking:recipe=1:take=1:go=1:n=4", metadata={"help": "game source (lib/games.py)"})
    split: str = field(default="eval", metadata={"help": "split of the game source: eval or train"})
    num_states: int = field(default=4, metadata={"help": "states scored together (one per game slot)"})
    random_steps: int = field(default=2, metadata={"help": "random commands played in each slot before scoring"})
    max_candidates: int = field(default=30, metadata={"help": "candidates per state at most (lib.scoring's cap)"})
    length_normalize: bool = field(default=False, metadata={"help": "mean instead of sum of the token log-probs"})
    repeats: int = field(default=2, metadata={"help": "timed calls of each method"})
    seed: int = field(default=0, metadata={"help": "seed of the random agent and of the game order"})
    goal: float = field(default=4.0, metadata={"help": "the speed-up (naive time / cached time) we aim for"})
    games_dir: str = field(default_factory=lambda: str(default_cache_dir()), metadata={"help": "generated games cache"})


def game_states(games: list[str], args: Args, prompt_config: PromptConfig, tokenizer) -> tuple[list[str], list[list[str]]]:
    """Prompts and candidate commands of `num_states` states reached by random play."""
    agent = RandomAgent(args.seed)
    with BatchEnv(games, args.num_states, max_episode_turns=50, seed=args.seed) as env:
        states = env.reset()
        histories: list[list[Turn]] = [[] for _ in states]
        for _ in range(args.random_steps):
            results = env.step(agent.act(states, [None] * len(states)))
            for slot, (state, result) in enumerate(zip(states, results)):
                turn = Turn(clean_observation(state.observation, state.objective), result.command)
                histories[slot] = [] if result.done else histories[slot] + [turn]
            states = [result.next_state for result in results]
    prompts = [
        build_prompt(s.objective, clean_observation(s.observation, s.objective), s.inventory, s.admissible_commands,
                     history, prompt_config, tokenizer)
        for s, history in zip(states, histories)
    ]
    return prompts, [candidate_commands(s, args.max_candidates) for s in states]


def timed(score, *inputs) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    with torch.no_grad():
        scores = score(*inputs)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = HfArgumentParser(Args)
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        args = parser.parse_yaml_file(sys.argv[1])[0]
    else:
        args = parser.parse_args_into_dataclasses()[0]
    for flag in ("num_states", "max_candidates", "repeats"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag} must be at least 1, got {getattr(args, flag)}", file=sys.stderr)
            sys.exit(2)
    prompt_config = PromptConfig()
    tokenizer = load_tokenizer(args.model_name_or_path)
    model = load_model(args.model_name_or_path).eval()
    games = resolve_games(args.games, args.split, args.games_dir)
    prompts, candidates = game_states(games, args, prompt_config, tokenizer)
    prompt_ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    candidate_ids = encode_candidates(candidates, prompt_config, tokenizer)
    inputs = (model, prompt_ids, candidate_ids, tokenizer.pad_token_id, args.length_normalize)
    answer_lengths = [len(ids) for rows in candidate_ids for ids in rows]
    print(f"{len(prompts)} states: prompts of {[len(ids) for ids in prompt_ids]} tokens, "
          f"{[len(c) for c in candidates]} candidates of {min(answer_lengths)}-{max(answer_lengths)} tokens "
          f"({torch.get_num_threads()} torch threads)")

    _, cached_scores = timed(candidate_logprobs, *inputs)
    times: dict[str, list[float]] = {"cached": [], "naive": []}
    for _ in range(args.repeats):
        elapsed, cached_scores = timed(candidate_logprobs, *inputs)
        times["cached"].append(elapsed)
        elapsed, naive_scores = timed(candidate_logprobs_naive, *inputs)
        times["naive"].append(elapsed)
    cached, naive = statistics.median(times["cached"]), statistics.median(times["naive"])
    max_abs_diff = max(float((c - n).abs().max()) for c, n in zip(cached_scores, naive_scores))
    print(f"cached: {cached:.2f} s, naive: {naive:.2f} s (medians of {args.repeats}); "
          f"scores agree to {max_abs_diff:.2e} (max abs diff)")
    print(json.dumps({
        "bench": "scoring",
        "states": len(prompts),
        "candidates": len(answer_lengths),
        "cached_s": round(cached, 3),
        "naive_s": round(naive, 3),
        "ratio": round(naive / cached, 2),
        "goal": args.goal,
        "max_abs_diff": max_abs_diff,
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
