import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lib.agents import way_back
from lib.env import BatchEnv, state_key
from lib.prompts import clean_observation


def scripted_command(state) -> str:
    """A deterministic command that depends only on the state: batched and solo runs must send the same ones."""
    commands = sorted(state.admissible_commands) + ["jump over the moon"]
    return commands[(3 * state.steps + len(state.observation)) % len(commands)]


def view(state) -> tuple:
    return state.game, state.observation, state.score, state.moves, state.admissible_commands, state.won, state.steps


def play_all(env: BatchEnv) -> dict[str, list[tuple]]:
    """Play every slot with `scripted_command` until all are idle; the states seen, per game, in order."""
    seen: dict[str, list[tuple]] = {}
    states = env.reset()
    while any(s is not None for s in states):
        for state in states:
            if state is not None:
                seen.setdefault(state.game, []).append(view(state))
        results = env.step([None if s is None else scripted_command(s) for s in states])
        for result in results:
            if result is not None and result.done:
                seen[result.state.game].append(view(result.state))
        states = [None if r is None else r.next_state for r in results]
    return seen


def test_batched_steps_match_solo_steps(small_games):
    with BatchEnv(small_games, num_envs=4, max_episode_turns=8, num_episodes=4) as env:
        batched = play_all(env)
    with BatchEnv(small_games, num_envs=1, max_episode_turns=8, num_episodes=4) as env:
        solo = play_all(env)
    assert sorted(batched) == sorted(small_games)
    assert batched == solo
    assert any(len(states) > 3 for states in solo.values())


def test_walkthrough_wins_rewards_are_score_changes_and_auto_reset(tiny_games):
    with BatchEnv(tiny_games, num_envs=1, max_episode_turns=10) as env:
        state = env.reset()[0]
        assert (state.game, state.episode, state.steps, state.score) == (tiny_games[0], 0, 0, 0)
        for episode in range(3):
            total = 0.0
            for i, command in enumerate(state.walkthrough):
                result = env.step([command])[0]
                assert result.reward == result.state.score - state.score
                assert not result.invalid
                total += result.reward
                if i < len(state.walkthrough) - 1:
                    assert not result.done and result.next_state is result.state
                    state = result.next_state
            assert result.terminated and not result.truncated and result.state.won
            assert total == result.state.score == result.state.max_score > 0
            state = result.next_state
            assert state is not result.state
            assert (state.episode, state.game, state.steps, state.score) == (
                episode + 1, tiny_games[(episode + 1) % 2], 0, 0
            )


def test_truncation_invalid_commands_and_idle_slots(tiny_games):
    with BatchEnv(tiny_games, num_envs=3, max_episode_turns=2, num_episodes=2) as env:
        states = env.reset()
        assert [s is None for s in states] == [False, False, True]
        first = env.step(["look", "dance wildly", None])
        assert first[2] is None
        assert not first[0].invalid and first[1].invalid
        assert not any(r.done for r in first[:2])
        second = env.step(["look", "look", None])
        for result in second[:2]:
            assert result.truncated and not result.terminated and result.done
            assert result.state.steps == 2 and not result.state.won
            assert result.next_state is None  # num_episodes ran out: the slot is idle
        assert env.states == [None, None, None]


def test_killed_worker_truncates_the_episode_and_the_run_goes_on(tiny_games):
    with BatchEnv(tiny_games, num_envs=2, max_episode_turns=10, step_timeout=20) as env:
        states = env.reset()
        env.step(["look", "look"])
        os.kill(env._workers[0].process.pid, signal.SIGKILL)
        env._workers[0].process.join(timeout=10)
        crashed, healthy = env.step(["look", "look"])
        assert crashed.crashed and crashed.truncated and not crashed.terminated
        assert crashed.state.steps == 2 and crashed.reward == 0
        assert not healthy.crashed and not healthy.done
        assert env.restarts == 1
        # The slot moves on to the next episode on a fresh process, which plays normally.
        state = crashed.next_state
        assert (state.episode, state.game, state.steps) == (2, tiny_games[0], 0)
        for command in state.walkthrough:
            result = env.step([command, "look"])[0]
        assert result.terminated and result.state.won and not result.crashed
        assert states[0].observation == state.observation


def test_rank_split_and_too_many_processes(small_games):
    halves = []
    for rank in range(2):
        env = BatchEnv(small_games, num_envs=1, rank=rank, world_size=2)
        halves.append(env.games)
        env.close()
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(small_games)
    assert halves[0] == small_games[0::2]
    with pytest.raises(ValueError, match="5 processes but only 4 games"):
        BatchEnv(small_games, num_envs=1, world_size=5)
    with pytest.raises(ValueError, match="at least 1"):
        BatchEnv(small_games, num_envs=0)


def test_workers_do_not_rerun_the_parents_script(tiny_games, tmp_path):
    """A script's own imports (torch, transformers, ...) must not run again in every worker process."""
    marker = tmp_path / "imported-by"
    script = tmp_path / "uses_env.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        f"with open({str(marker)!r}, 'a') as handle:\n"
        "    handle.write(f'{os.getpid()}\\n')\n"
        "from lib.env import BatchEnv\n"
        "if __name__ == '__main__':\n"
        f"    with BatchEnv({tiny_games!r}, num_envs=2) as env:\n"
        "        assert all(state.admissible_commands for state in env.reset())\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    assert len(marker.read_text().split()) == 1


def test_hung_worker_is_treated_like_a_dead_one(tiny_games):
    # One slot: under a loaded machine a healthy game could also miss a short timeout.
    with BatchEnv(tiny_games[:1], num_envs=1, max_episode_turns=10, step_timeout=10) as env:
        env.reset()
        os.kill(env._workers[0].process.pid, signal.SIGSTOP)  # alive, never answers
        (hung,) = env.step(["look"])
        assert hung.crashed and hung.truncated and not hung.terminated
        assert env.restarts >= 1 and hung.next_state.steps == 0
        (after,) = env.step(["look"])
        assert not after.crashed  # the fresh process plays on


def test_state_dict_puts_every_slot_back_where_it_stood(small_games):
    """A fresh env loaded from state_dict continues exactly like the env it was taken from (episodes, games, steps)."""
    options = {"num_envs": 3, "max_episode_turns": 4, "shuffle": True, "seed": 3}
    with BatchEnv(small_games, **options) as env:
        env.reset()
        for commands in (["look"] * 3, ["inventory", "look", "go north"], ["look"] * 3, ["look"] * 3, ["look"] * 3):
            env.step(commands)
        saved = env.state_dict()
        assert any(saved["commands"])  # some slot is mid-episode
        with BatchEnv(small_games, **options) as restored:
            assert restored.load_state_dict(saved) == env.states
            for commands in (["look"] * 3, ["inventory"] * 3, ["look"] * 3, ["look"] * 3):
                assert [r.next_state for r in restored.step(commands)] == [r.next_state for r in env.step(commands)]
    with BatchEnv(small_games, num_envs=2, seed=3) as other, pytest.raises(ValueError, match="resume with the flags"):
        other.load_state_dict(saved)


def test_group_members_play_the_same_game_from_the_same_start(small_games):
    options = {"num_envs": 4, "max_episode_turns": 2, "shuffle": True, "seed": 5}
    grouped, solo = BatchEnv(small_games, **options, group_size=2, num_episodes=3), BatchEnv(small_games, **options)
    with grouped, solo:
        states, solo_states = grouped.reset(), solo.reset()
        assert [s and s.episode for s in states] == [0, 0, 1, 1]
        # One game per group episode, in the order a run without groups hands its slots their games.
        assert [s.game for s in states] == [s.game for s in solo_states[:2] for _ in range(2)]
        assert states[0].game != states[2].game
        assert view(states[0]) == view(states[1]) and view(states[2]) == view(states[3])
        # Members take different commands and still move on together, onto one new episode per group (the last
        # one: group 1 finds none left and goes idle).
        for commands in (["look", "inventory", "inventory", "look"], ["look"] * 4):
            results = grouped.step(commands)
        assert all(result.truncated for result in results)
        assert [result.next_state and result.next_state.episode for result in results] == [2, 2, None, None]
        assert results[0].next_state.game == results[1].next_state.game == solo_states[2].game
        assert view(results[0].next_state) == view(results[1].next_state)
        assert grouped.states[2:] == [None, None]


def test_a_member_that_ends_first_waits_for_its_group(tiny_games):
    with BatchEnv(tiny_games, num_envs=4, max_episode_turns=4, group_size=2) as env:
        first = env.reset()
        won, wandering, *others = env.step([first[0].walkthrough[0], "look", "look", "look"])
        assert won.terminated and won.state.won and won.next_state is None
        assert not wandering.done and env.states[0] is None
        assert all(not result.done for result in others)
        # The waiting member ignores its command while the others play on.
        waiting = env.step(["take coin", "look", "look", "look"])
        assert waiting[0] is None and env.states[0] is None and waiting[1].state.steps == 2
        env.step([None, "look", "look", "look"])
        last = env.step([None, "look", None, None])  # group 1 holds: only group 0 resets
        assert last[0] is None and last[1].truncated and not last[1].state.won
        assert env.states[0] == last[1].next_state == env.states[1]
        assert (last[1].next_state.episode, last[1].next_state.game, last[1].next_state.steps) == (2, tiny_games[0], 0)
        assert view(last[1].next_state) == view(first[0])
        assert [state.episode for state in env.states[2:]] == [1, 1]


def test_a_playing_slot_without_a_command_holds(tiny_games):
    with BatchEnv(tiny_games, num_envs=3, max_episode_turns=2) as env:
        env.reset()
        env.step(["look", "look", "look"])
        before = env.states
        held, moved, won = env.step([None, "look", "take coin"])
        assert held is None and env.states[0] == before[0] and env.states[0].steps == 1
        assert moved.truncated and moved.state.steps == 2 and won.terminated
        # The hold did not count against the step limit, and the slot plays on where it stood.
        (result, *_) = env.step(["inventory", "look", "look"])
        assert result.state.steps == 2 and result.state.game == before[0].game and result.truncated


def test_state_dict_brings_waiting_members_back_waiting(small_games):
    options = {"num_envs": 4, "max_episode_turns": 5, "shuffle": True, "seed": 3, "group_size": 2}
    with BatchEnv(small_games, **options) as env:
        states = env.reset()
        for command in states[0].walkthrough:
            env.step([command, "look", "look", "inventory"])
        assert env.states[0] is None and env.states[1] is not None  # the winner waits for its partner
        saved = json.loads(json.dumps(env.state_dict()))
        assert saved["group_size"] == 2
        with BatchEnv(small_games, **options) as restored:
            assert restored.load_state_dict(saved) == env.states
            for _ in range(5):
                commands = [None if state is None else scripted_command(state) for state in env.states]
                assert restored.step(commands) == env.step(commands)
                assert restored.states == env.states
            assert env.states[0].episode == env.states[1].episode == 2  # the group moved on within those steps
    with BatchEnv(small_games, **{**options, "group_size": 1}) as solo:
        with pytest.raises(ValueError, match="group_size 2, not 1"):
            solo.load_state_dict(saved)


def test_slots_must_fill_whole_groups(tiny_games):
    with pytest.raises(ValueError, match="num_envs=3 is not divisible by group_size=2"):
        BatchEnv(tiny_games, num_envs=3, group_size=2)


def test_state_key_names_the_state_whatever_the_path(small_games):
    """GiGPO's step groups: a group's members start with one key; looking around keeps it, another room or a wrong
    command changes it (the same answer in two rooms too), and walking back into the start room gives the start's key
    again (not the moves or history)."""
    with BatchEnv(small_games[:1], num_envs=2, group_size=2) as env:
        first, second = env.reset()
        start = state_key(first)
        assert state_key(second) == start and len(start) == 16
        exit_ = next(command for command in first.admissible_commands if way_back(command))
        walked, looked = env.step([exit_, "look"])
        assert state_key(looked.state) == start and state_key(walked.state) != start
        # The same answer in two rooms: two states.
        there, here = env.step(["jump over the moon", "jump over the moon"])
        assert clean_observation(there.state.observation) == clean_observation(here.state.observation)
        assert state_key(there.state) != state_key(here.state)
        back, _ = env.step([way_back(exit_), "look"])
        assert state_key(back.state) == start and back.state.steps == 3


def test_textworld_location_is_the_players_room(small_games):
    """--least_tried's places: the room, which `look` and `inventory` keep and an exit changes, coming back as it was."""
    with BatchEnv(small_games[:1], num_envs=1) as env:
        start = env.reset()[0]
        assert start.location
        assert [env.step([command])[0].state.location for command in ("look", "inventory")] == [start.location] * 2
        exit_ = next(command for command in start.admissible_commands if way_back(command))
        there = env.step([exit_])[0].state
        assert there.location not in ("", start.location)
        assert env.step([way_back(exit_)])[0].state.location == start.location
