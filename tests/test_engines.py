"""TextWorldExpress and ScienceWorld behind BatchEnv, played on the real engines (Java, from their PyPI wheels), with
tiny budgets: the protocol per engine, batches mixing engines with auto-reset, the resume's replay, crash restarts,
prompts cleaned from real observations, game sources and their errors."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lib import engines
from lib.engines import ExpressEngine, ScienceEngine, engine_of, science_variations
from lib.env import BatchEnv
from lib.games import GameError, check_game_source, resolve_games
from lib.prompts import clean_inventory, clean_observation

ROOT = Path(__file__).resolve().parents[1]
COIN = "twx:coin:train:1:numLocations=3"  # walkthrough: look around, take coin
LIVING_THING = "sciworld:find-living-thing:0:easy"  # walkthrough: 10 commands, starts at 8 points of 100
ARITHMETIC = "twx:arithmetic:train:1"


@pytest.fixture(params=["textworld", "twx", "sciworld"])
def engine_game(request, tiny_games) -> str:
    return {"textworld": tiny_games[0], "twx": COIN, "sciworld": LIVING_THING}[request.param]


def view(state) -> tuple:
    return (state.game, state.episode, state.steps, state.observation, state.score, state.inventory,
            state.admissible_commands, state.won, state.lost)


def test_each_engine_resets_steps_scores_and_wins_by_its_walkthrough(engine_game):
    with BatchEnv([engine_game], num_envs=1, max_episode_turns=30) as env:
        state = env.reset()[0]
        assert engine_of(state.game) == engine_of(engine_game)
        assert state.observation and state.objective and state.walkthrough
        assert state.admissible_commands == sorted(set(state.admissible_commands))
        assert 0 <= state.score < state.max_score and not (state.won or state.lost)
        first_score, total = state.score, 0.0
        for command in state.walkthrough:
            result = env.step([command])[0]
            assert result.reward == pytest.approx(result.state.score - state.score) and not result.crashed
            total += result.reward
            state = result.next_state
            if result.done:
                break
        assert result.terminated and result.state.won and not result.state.lost
        assert result.state.score == result.state.max_score
        assert total == pytest.approx(result.state.max_score - first_score)
        assert (state.episode, state.steps, state.score) == (1, 0, first_score)  # auto-reset onto the next episode


@pytest.mark.parametrize("game, losing_commands", [
    (ARITHMETIC, ["take math problem", "put math problem in box"]),  # the answer's item belongs in the box
    (LIVING_THING, ["focus on air"]),  # focusing on the wrong thing fails the task
])
def test_a_failed_task_is_lost_with_score_zero(game, losing_commands):
    """Both engines report failure as a negative score (-1, -100 points): the state says lost, score 0, and the
    reward takes back the progress made."""
    with BatchEnv([game], num_envs=1, max_episode_turns=30, num_episodes=1) as env:
        before = env.reset()[0]
        for command in losing_commands:
            result = env.step([command])[0]
        assert result.terminated and result.state.lost and not result.state.won
        assert result.state.score == 0 and result.reward == pytest.approx(-before.score)


def test_mixed_engines_batch_auto_reset_and_resume_replay():
    games = [COIN, LIVING_THING]
    coin_commands = ["look around", "take coin", "look around", "look around"]
    with BatchEnv(games, num_envs=2, max_episode_turns=3) as env:
        states = env.reset()
        assert [s.game for s in states] == games
        for step, command in enumerate(coin_commands):
            results = env.step([command, states[1].walkthrough[states[1].steps]])
            states = [r.next_state for r in results]
            if step == 1:  # the coin is taken: won, and the slot moves on to the next episode
                assert results[0].terminated and results[0].state.won
                assert (states[0].episode, states[0].game) == (2, COIN)
            if step == 2:  # 3 of the 10 gold commands: cut short
                assert results[1].truncated and not results[1].terminated
                assert (states[1].episode, states[1].game) == (3, LIVING_THING)
        saved, expected = env.state_dict(), [view(s) for s in env.states]
    assert saved["commands"][0] == ["look around", "look around"] and len(saved["commands"][1]) == 1
    with BatchEnv(games, num_envs=2, max_episode_turns=3) as resumed:
        assert [view(s) for s in resumed.load_state_dict(saved)] == expected


def test_a_killed_worker_or_jvm_is_a_crash_and_the_slot_plays_on():
    with BatchEnv([COIN], num_envs=2, max_episode_turns=10, step_timeout=20) as env:
        first = env.reset()
        env.step(["look around", "look around"])
        os.kill(env._workers[0].process.pid, signal.SIGKILL)
        env._workers[0].process.join(timeout=10)
        for java in _children(env._workers[1].process.pid):  # the engine's JVM: py4j fails, the worker answers
            os.kill(java, signal.SIGKILL)
        results = env.step(["look around", "look around"])
        assert all(r.crashed and r.truncated and not r.terminated for r in results)
        assert env.restarts == 2 and set(env.crashes) == {COIN}
        for slot, result in enumerate(results):  # fresh processes, a fresh JVM each, playing the next episodes
            state = result.next_state
            assert state.steps == 0 and state.observation == first[slot].observation
        replies = env.step([s.walkthrough[0] for s in env.states])
        assert not any(r.crashed for r in replies)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as file:
        return [int(child) for child in file.read().split()]


def test_prompts_clean_real_observations_of_each_engine():
    express = ExpressEngine()
    try:
        start = express.reset(COIN)
        assert clean_inventory(start["inventory"]) == ""  # "Your inventory is currently empty."
        cleaned = clean_observation(start["observation"], start["objective"])
        assert cleaned.startswith("You are in the kitchen.") and "To the" in cleaned
        assert cleaned == cleaned.strip() and not any(line != line.strip() for line in cleaned.splitlines())
        after = express.step("take coin")
        assert clean_inventory(after["inventory"]).endswith("a coin")
    finally:
        express.close()
    science = ScienceEngine()
    try:
        start = science.reset(LIVING_THING)
        assert "an orange" in clean_inventory(start["inventory"])
        cleaned = clean_observation(start["observation"], start["objective"])
        assert cleaned.startswith("This room is called the hallway.") and "\t" not in cleaned
        after = science.step("put down orange")
        assert clean_inventory(after["inventory"]) == ""  # "In your inventory, you see:\n\tnothing"
        task = science.step("task")
        assert clean_observation(task["observation"], task["objective"]) == "Task description:"
    finally:
        science.close()


def test_sources_split_on_disjoint_seeds_and_scienceworld_folds(games_cache):
    train = resolve_games("twx-coin:numLocations=3:n=3", "train", games_cache, progress=False)
    held_out = resolve_games("twx-coin:numLocations=3:n=3", "eval", games_cache, progress=False)
    assert train == [f"twx:coin:train:{seed}:numLocations=3" for seed in range(3)]
    assert len(held_out) == 3 and not set(train) & set(held_out) and all(":dev:" in g for g in held_out)
    folds = science_variations(["boil"])["boil"]
    assert (folds["train"], folds["dev"], folds["test"]) == (range(14), range(14, 21), range(21, 30))
    mixture = resolve_games("sciworld-boil:simplify=openDoors+teleportAction:n=2,twx-sorting:n=1,tiny", "eval",
                            games_cache, progress=False)
    assert mixture[:3] == ["sciworld:boil:14:openDoors,teleportAction", "sciworld:boil:15:openDoors,teleportAction",
                           "twx:sorting:dev:1000000"]
    assert [engine_of(game) for game in mixture] == ["sciworld", "sciworld", "twx", "textworld", "textworld"]
    every_dev_variation = resolve_games("sciworld-boil:simplify=openDoors+teleportAction:n=100", "eval", games_cache,
                                        progress=False)
    assert len(every_dev_variation) == 7


def test_eval_fold_test_evaluates_on_the_engines_test_folds(games_cache):
    """`eval_fold=test` moves the eval split from the dev fold to the test fold (ScienceWorld's test variations, the
    TextWorldExpress test fold's games) and leaves the train split as it was."""
    # The test above's specs: when both run, their first games have started (check_engine_specs: once a process).
    dev_source = "sciworld-boil:simplify=openDoors+teleportAction:n=100,twx-coin:numLocations=3:n=2"
    test_source = dev_source.replace(":n=", ":eval_fold=test:n=")
    train, dev, test = (resolve_games(source, split, games_cache, progress=False)
                        for source, split in ((test_source, "train"), (dev_source, "eval"), (test_source, "eval")))
    test_variations = science_variations(["boil"])["boil"]["test"]
    assert test == [f"sciworld:boil:{variation}:openDoors,teleportAction" for variation in test_variations] + [
        "twx:coin:test:1000000:numLocations=3", "twx:coin:test:1000001:numLocations=3"]
    assert len(test) == 9 + 2 and not set(test) & set(train) and not set(test) & set(dev)
    assert train == resolve_games(dev_source, "train", games_cache, progress=False)


@pytest.mark.parametrize("source, message", [
    ("twx-coins", "unknown TextWorldExpress game 'coins'.*known: coin, cookingworld, twc"),
    ("twx-coin:level=3", "unknown option 'level' for twx-coin.*options: n, numLocations"),
    ("twx-coin:numLocations=50", "numLocations=50 does not start in TextWorldExpress.*less than or equal to 11"),
    ("sciworld-boiling", "unknown ScienceWorld task 'boiling'.*known: boil, melt"),
    ("sciworld-boil:simplify=hard", "unknown simplification 'hard'.*known: easy, teleportAction"),
    ("sciworld-boil:eval_fold=train", "eval_fold='train' in 'sciworld-boil:eval_fold=train' is not one of dev, test"),
    ("twx-coin:eval_fold=", "eval_fold='' in 'twx-coin:eval_fold=' is not one of dev, test"),
])
def test_bad_engine_sources_name_what_exists(source, message):
    with pytest.raises(GameError, match=message):
        check_game_source(source)


def test_missing_java_is_an_error_line_naming_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(engines.shutil, "which", lambda name: None)
    for source in ("twx-coin", "sciworld-easy"):  # a spec, a named set
        with pytest.raises(GameError, match="needs Java 17 or newer.*openjdk-17"):
            check_game_source(source)
    # play.py says it in one line before anything starts: no `java` on an empty PATH.
    result = subprocess.run([sys.executable, "play.py", "--agent", "random", "--games", "sciworld-boil"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: --games: 'sciworld-boil' is a ScienceWorld game, which needs Java 17 or newer"
    )
