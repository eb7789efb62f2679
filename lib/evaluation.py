"""Playing a fixed number of episodes with an agent and reporting how well it did, per game and overall.

Used by play.py and by the training scripts' periodic held-out evaluation. Episode k (counted over all processes)
plays game k % len(games), so every game gets the same share of episodes whatever their lengths. In a distributed
run each rank plays the episodes of its games (BatchEnv splits games by rank) and `merge_reports` of the gathered
per-rank reports gives the same report as one process would.

Report keys: agent, episodes, crashed, normalized_score (mean of final score / max score), win_rate, mean_steps (turns
per episode), invalid_rate (non-admissible commands / commands), mean_score, and `games`, one dict per game with the
same metrics. Metrics of a game (or a rank) without episodes are None.

A crashed episode (its game's process died or hung, or the game failed: lib.env's StepResult.crashed) says nothing
about the agent: it is counted under `crashed` and left out of `episodes` and of every metric, rather than counted
as an episode played to a 0% score. The table shows a `crashed` column when there is one.

Transcripts: one dict per turn with game, env (its engine: textworld, twx or sciworld), episode (global number), turn (1 = the episode's first command), prompt (the
prompt text; the cleaned observation for agents that read no prompts), response (the agent's raw text), command,
observation (the game's raw answer), reward, score, max_score, done, won, invalid, then the agent's own columns
(`Agent.transcript_columns`: the scoring agent's candidates and chosen_index).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from lib.agents import Agent, SessionEnded, past_turn
from lib.engines import engine_of
from lib.env import BatchEnv
from lib.games import game_name
from lib.prompts import PromptConfig, Turn, build_prompt, clean_observation
from lib.stopping import Stopped

GAME_METRICS = ("normalized_score", "win_rate", "mean_steps", "invalid_rate")
TABLE_COLUMNS = ("episodes", "norm score", "win rate", "steps", "invalid")
CRASHED_COLUMN = "crashed"


@dataclass
class EvalResult:
    report: dict
    transcripts: list[dict]  # one dict per turn, see the module docstring


def episode_record(game: str, score: float, max_score: float, won: bool, steps: int, invalid: int,
                   crashed: bool = False) -> dict:
    return {"game": game, "score": score, "max_score": max_score, "won": won, "steps": steps, "invalid": invalid,
            "crashed": crashed}


def _metrics(records: list[dict]) -> dict:
    episodes = [e for e in records if not e.get("crashed")]
    crashed = len(records) - len(episodes)
    if not episodes:
        return {"episodes": 0, "crashed": crashed, **dict.fromkeys(GAME_METRICS)}
    commands = sum(e["steps"] for e in episodes)
    return {
        "episodes": len(episodes),
        "crashed": crashed,
        # A game without points (max_score 0) counts as fully solved only when won.
        "normalized_score": sum(e["score"] / e["max_score"] if e["max_score"] else float(e["won"]) for e in episodes)
        / len(episodes),
        "win_rate": sum(e["won"] for e in episodes) / len(episodes),
        "mean_steps": commands / len(episodes),
        "invalid_rate": sum(e["invalid"] for e in episodes) / commands if commands else None,
    }


def summarize_episodes(episodes: list[dict], agent: str, games: list[str]) -> dict:
    """Per-episode records (see `episode_record`) -> the report; `games` (names) fixes the per-game rows' order."""
    overall = _metrics(episodes)
    played = [e["score"] for e in episodes if not e.get("crashed")]
    mean_score = sum(played) / len(played) if played else None
    rows = [{"game": name, **_metrics([e for e in episodes if e["game"] == name])} for name in dict.fromkeys(games)]
    return {"agent": agent, **overall, "mean_score": mean_score, "games": rows}


def _weighted_mean(values: list, weights: list[float]) -> float | None:
    """Mean of `values` weighted by `weights`, skipping parts without weight (their values are None)."""
    total = sum(weights)
    return sum(w * v for v, w in zip(values, weights) if w) / total if total else None


def _merge_metrics(parts: list[dict]) -> dict:
    episodes = [p["episodes"] for p in parts]
    merged = {"episodes": sum(episodes), "crashed": sum(p.get("crashed", 0) for p in parts)}
    for key in ("normalized_score", "win_rate", "mean_steps"):
        merged[key] = _weighted_mean([p[key] for p in parts], episodes)
    # The invalid rate is per command: weight each part by its number of commands (episodes * mean steps).
    commands = [p["episodes"] * (p["mean_steps"] or 0) for p in parts]
    merged["invalid_rate"] = _weighted_mean([p["invalid_rate"] for p in parts], commands)
    return merged


def merge_reports(reports: list[dict]) -> dict:
    """Per-rank reports, in rank order -> the global report (episode-weighted; invalid rate command-weighted)."""
    if not reports:
        raise ValueError("no reports to merge")
    rows: dict[str, list[dict]] = {}
    # Rank r holds games r, r + W, r + 2W, ...: taking the ranks' rows in turn restores the original game order.
    for index in range(max(len(r["games"]) for r in reports)):
        for report in reports:
            if index < len(report["games"]):
                row = report["games"][index]
                rows.setdefault(row["game"], []).append(row)
    merged = {"agent": reports[0]["agent"], **_merge_metrics(reports)}
    merged["mean_score"] = _weighted_mean([r["mean_score"] for r in reports], [r["episodes"] for r in reports])
    merged["games"] = [{"game": name, **_merge_metrics(parts)} for name, parts in rows.items()]
    return merged


def rank_episodes(num_episodes: int, num_games: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The global episode numbers that `rank` plays: those whose game (k % num_games) belongs to it."""
    return [k for k in range(num_episodes) if (k % num_games) % world_size == rank]


def _format(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


def format_report_table(report: dict) -> str:
    """A fixed-width table: one row per game, then the overall row (labelled partial for a report marked so); a
    `crashed` column when an episode crashed."""
    with_crashes = bool(report.get("crashed"))
    rows = [("game", *TABLE_COLUMNS, *[CRASHED_COLUMN] * with_crashes)]
    overall = f"all ({report['agent']}, partial)" if report.get("partial") else f"all ({report['agent']})"
    for part in report["games"] + [{**report, "game": overall}]:
        rows.append((
            part["game"],
            str(part["episodes"]),
            _format(part["normalized_score"], percent=True),
            _format(part["win_rate"], percent=True),
            _format(part["mean_steps"], percent=False),
            _format(part["invalid_rate"], percent=True),
            *[str(part.get("crashed", 0))] * with_crashes,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


@contextlib.contextmanager
def finished_kept_on_stop(finished_part: Callable[[], EvalResult], bar):
    """A stop signal (lib.stopping.Stopped) leaves carrying `finished_part()`, the report and transcripts of the
    episodes finished by then: play.py writes them, a trainer just unwinds."""
    try:
        yield
    except Stopped as stop:
        bar.close()  # before the script's closing line, which would otherwise land on the bar's line
        stop.finished = finished_part()
        raise


def evaluate(
    agent: Agent,
    games: list[str],
    num_episodes: int,
    num_envs: int,
    max_episode_turns: int,
    prompt_config: PromptConfig,
    tokenizer=None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    sync_active: Callable[[bool], bool] | None = None,
) -> EvalResult:
    """Play `num_episodes` episodes (over all ranks; this rank plays its share) and report; see the module docstring.

    `sync_active(this_rank_playing) -> any_rank_playing` (e.g. an all-reduce) keeps the ranks in lockstep until all
    are done, for a model sharded with ZeRO-3 (`synced_gpus`), whose every generate call needs every rank: a rank
    without games left keeps calling the agent with idle slots. A human agent that quits ends the run early: the
    report covers the episodes finished by then. A stop signal (lib.stopping.Stopped) ends it too, carrying the report
    and transcripts of the finished episodes.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be at least 1, got {num_episodes}")
    if agent.needs_prompts and tokenizer is None:
        raise ValueError(f"the {agent.name} agent reads prompts: pass the tokenizer that builds them")
    if agent.max_envs is not None and num_envs > agent.max_envs:
        raise ValueError(
            f"the {agent.name} agent plays at most {agent.max_envs} game(s) at once, got num_envs={num_envs}"
        )
    episode_ids = rank_episodes(num_episodes, len(games), rank, world_size)
    names = [game_name(g) for g in games[rank::world_size]]
    episodes: list[dict] = []
    transcripts: list[dict] = []
    num_envs = max(1, min(num_envs, len(episode_ids)))

    def still_playing(states) -> bool:
        playing = any(state is not None for state in states)
        return sync_active(playing) if sync_active else playing

    finished: set[int] = set()  # global numbers of the episodes played to their end

    def finished_part() -> EvalResult:
        return EvalResult(summarize_episodes(episodes, agent.name, names),
                          [turn for turn in transcripts if turn["episode"] in finished])

    bar = tqdm(total=len(episode_ids), desc=f"eval {agent.name}", disable=not progress)
    with BatchEnv(games, num_envs, max_episode_turns, num_episodes=len(episode_ids), seed=seed, rank=rank,
                  world_size=world_size) as env, finished_kept_on_stop(finished_part, bar):
        states = env.reset()
        histories: list[list[Turn]] = [[] for _ in range(num_envs)]
        invalid = [0] * num_envs
        while still_playing(states):
            observations = [None if s is None else clean_observation(s.observation, s.objective) for s in states]
            prompts = list(observations)
            if agent.needs_prompts:
                prompts = [
                    None if s is None else build_prompt(
                        s.objective, obs, s.inventory, s.admissible_commands, history, prompt_config, tokenizer
                    )
                    for s, obs, history in zip(states, observations, histories)
                ]
            try:
                commands = agent.act(states, prompts if agent.needs_prompts else [None] * num_envs)
            except SessionEnded:
                break
            responses = agent.responses(commands)
            results = env.step(commands)
            agent.observe(results)
            for slot, result in enumerate(results):
                if result is None:
                    continue
                after = result.state
                invalid[slot] += result.invalid
                transcripts.append({
                    "game": game_name(after.game),
                    "env": engine_of(after.game),
                    "episode": episode_ids[after.episode],
                    "turn": after.steps,
                    "prompt": prompts[slot],
                    "response": responses[slot],
                    "command": result.command,
                    "observation": after.observation,
                    "reward": result.reward,
                    "score": float(after.score),
                    "max_score": float(after.max_score),
                    "done": result.done,
                    "won": after.won,
                    "invalid": result.invalid,
                    **agent.transcript_columns(slot),
                })
                if result.done:
                    finished.add(episode_ids[after.episode])
                    episodes.append(episode_record(
                        game_name(after.game), after.score, after.max_score, after.won, after.steps, invalid[slot],
                        result.crashed,
                    ))
                    histories[slot], invalid[slot] = [], 0
                    bar.update()
                else:
                    histories[slot].append(past_turn(states[slot], result.command, after))
            states = env.states  # a slot the agent left without a command holds where it was
    bar.close()
    return EvalResult(summarize_episodes(episodes, agent.name, names), transcripts)
