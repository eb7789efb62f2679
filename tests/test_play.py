import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import load_from_disk

import play
from lib.agents import (
    HumanAgent,
    ModelAgent,
    RandomAgent,
    SessionEnded,
    WalkthroughAgent,
)
from lib.env import GameState, StepResult
from lib.evaluation import (
    episode_record,
    evaluate,
    format_report_table,
    merge_reports,
    rank_episodes,
    summarize_episodes,
)
from lib.games import game_name
from lib.generation import GenerationConfig
from lib.models import load_model, load_tokenizer
from lib.prompts import PromptConfig, parse_command

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("normalized_score", "win_rate", "mean_steps", "invalid_rate")
TRANSCRIPT_COLUMNS = {"game", "env", "episode", "turn", "prompt", "response", "command", "observation", "reward", "score",
                      "max_score", "done", "won", "invalid"}


def state(steps=0, walkthrough=("go west", "take coin"), admissible=("go west", "look"), episode=0) -> GameState:
    return GameState(
        game="g.z8", episode=episode, observation="-= Cellar =-\nA cellar.\n\n> -= Cellar =-0/1", score=0, max_score=1,
        moves=steps, won=False, lost=False, admissible_commands=list(admissible), objective="Get the coin.",
        inventory="You are carrying nothing.", walkthrough=list(walkthrough) if walkthrough else None, steps=steps,
    )


def assert_same_report(report: dict, expected: dict) -> None:
    """Equal reports up to float rounding (pytest.approx compares no nested rows)."""
    assert {k: v for k, v in report.items() if k != "games"} == pytest.approx({k: v for k, v in expected.items() if k != "games"})
    assert len(report["games"]) == len(expected["games"])
    for row, expected_row in zip(report["games"], expected["games"]):
        assert row == pytest.approx(expected_row)


def run_play(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "play.py"), *args], cwd=cwd, capture_output=True, text=True)


# ---------------------------------------------------------------- reports


def test_summarize_episodes_per_game_and_overall():
    episodes = [
        episode_record("a", score=1, max_score=1, won=True, steps=2, invalid=0),
        episode_record("a", score=0, max_score=1, won=False, steps=10, invalid=5),
        episode_record("b", score=1, max_score=4, won=False, steps=8, invalid=1),
        episode_record("c", score=0, max_score=0, won=True, steps=4, invalid=0),
    ]
    report = summarize_episodes(episodes, "random", ["a", "b", "c", "d"])
    assert report["agent"] == "random" and report["episodes"] == 4
    assert report["normalized_score"] == pytest.approx((1 + 0 + 0.25 + 1) / 4)
    assert report["win_rate"] == 0.5
    assert report["mean_steps"] == 6
    assert report["invalid_rate"] == pytest.approx(6 / 24)
    assert report["mean_score"] == 0.5
    rows = {row["game"]: row for row in report["games"]}
    assert list(rows) == ["a", "b", "c", "d"]
    assert rows["a"] == {"game": "a", "episodes": 2, "crashed": 0, "normalized_score": 0.5, "win_rate": 0.5,
                         "mean_steps": 6.0, "invalid_rate": 5 / 12}
    assert rows["d"] == {"game": "d", "episodes": 0, "crashed": 0, **dict.fromkeys(METRICS)}
    table = format_report_table(report)
    lines = table.splitlines()
    assert lines[0].split() == ["game", "episodes", "norm", "score", "win", "rate", "steps", "invalid"]
    assert lines[2].split() == ["a", "2", "50.0%", "50.0%", "6.00", "41.7%"]
    assert lines[5].split() == ["d", "0", "-", "-", "-", "-"]
    assert lines[-1].split() == ["all", "(random)", "4", "56.2%", "50.0%", "6.00", "25.0%"]
    empty = summarize_episodes([], "human", ["a"])
    assert empty["episodes"] == 0 and empty["normalized_score"] is None and empty["mean_score"] is None
    assert "-" in format_report_table(empty).splitlines()[-1].split()


def test_rank_shares_cover_every_episode_once():
    for num_episodes, num_games, world_size in [(12, 4, 2), (7, 3, 2), (5, 5, 3), (2, 4, 2), (9, 2, 1)]:
        shares = [rank_episodes(num_episodes, num_games, rank, world_size) for rank in range(world_size)]
        assert sorted(sum(shares, [])) == list(range(num_episodes))
        for rank, share in enumerate(shares):
            assert all((k % num_games) % world_size == rank for k in share)


def test_merge_reports_equals_the_single_process_report():
    games = ["g0", "g1", "g2", "g3", "g4"]
    episodes = [
        episode_record(games[k % 5], score=k % 3, max_score=2, won=k % 3 == 2, steps=1 + k, invalid=k % 4)
        for k in range(13)
    ]
    whole = summarize_episodes(episodes, "model", games)
    parts = [
        summarize_episodes([e for e in episodes if games.index(e["game"]) % 2 == rank], "model", games[rank::2])
        for rank in range(2)
    ]
    merged = merge_reports(parts)
    assert [row["game"] for row in merged["games"]] == games
    assert merged["episodes"] == whole["episodes"] == 13
    for key in (*METRICS, "mean_score"):
        assert merged[key] == pytest.approx(whole[key])
    for merged_row, row in zip(merged["games"], whole["games"]):
        assert merged_row == pytest.approx(row)
    # A rank without episodes weighs nothing.
    assert_same_report(merge_reports([whole, summarize_episodes([], "model", [])]), whole)
    with pytest.raises(ValueError, match="no reports"):
        merge_reports([])


# ---------------------------------------------------------------- agents


def test_random_and_walkthrough_agents():
    states = [state(admissible=("go west", "look", "take coin")), None, state(admissible=())]
    first = RandomAgent(seed=3)
    commands = [first.act(states, [None] * 3) for _ in range(30)]
    assert all(c[1] is None and c[0] in states[0].admissible_commands and c[2] == "look" for c in commands)
    assert {c[0] for c in commands} == set(states[0].admissible_commands)
    again = RandomAgent(seed=3)
    assert commands == [again.act(states, [None] * 3) for _ in range(30)]
    assert [c[0] for c in commands] != [RandomAgent(seed=4).act(states, [None] * 3)[0] for _ in range(30)]

    # least_tried: each command of an observation once before any twice, the episode's end forgetting them.
    cellar = state(admissible=("go west", "look", "take coin"))
    for seed in range(5):
        explorer = RandomAgent(seed=seed, least_tried=True)
        played = []
        for turn in range(9):
            played += explorer.act([cellar], [None])
            explorer.observe([StepResult(played[-1], 0.0, turn == 4, False, cellar, cellar)])
        assert sorted(played[:3]) == sorted(played[5:8]) == sorted(cellar.admissible_commands)
        assert played[3] != played[4]

    walkthrough = WalkthroughAgent()
    assert not walkthrough.needs_prompts
    steps = [state(steps=0), state(steps=1), state(steps=2), state(walkthrough=None), None]
    assert walkthrough.act(steps, [None] * 5) == ["go west", "take coin", "look", "look", None]


def test_human_agent_reads_commands_until_quit():
    inputs = iter(["", "help", "  Go West ", "quit"])
    printed = []
    agent = HumanAgent(input_fn=lambda prompt: next(inputs), print_fn=printed.append)
    assert agent.act([state()], [None]) == ["go west"]
    text = "\n".join(printed)
    assert "Goal: Get the coin." in text and "A cellar." in text and "score 0/1" in text
    assert "Possible commands: go west, look" in text and "-= Cellar" not in text
    with pytest.raises(SessionEnded):
        agent.act([state(steps=1)], [None])
    eof = HumanAgent(input_fn=lambda prompt: (_ for _ in ()).throw(EOFError), print_fn=printed.append)
    with pytest.raises(SessionEnded):
        eof.act([state()], [None])
    with pytest.raises(ValueError, match="one game at a time"):
        agent.act([state(), state()], [None, None])
    won = state(steps=2)
    won.won, won.score = True, 1
    agent.observe([StepResult("take coin", 1.0, True, False, won, None)])
    assert printed[-1] == "*** episode won: score 1/1 in 2 steps"


def test_model_agent_answers_active_slots(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path)
    agent = ModelAgent(load_model(tiny_model_path), tokenizer, GenerationConfig(max_new_tokens=3, do_sample=False))
    assert agent.needs_prompts
    commands = agent.act([state(), None, state()], ["Go west or look?\n> ", None, "You see a coin.\n> "])
    assert commands[1] is None and agent.texts[1] is None
    assert [commands[0], commands[2]] == agent.last.commands
    assert [agent.texts[0], agent.texts[2]] == agent.last.texts
    assert len(agent.last.response_ids) == 2 and all(1 <= len(ids) <= 3 for ids in agent.last.response_ids)


# ---------------------------------------------------------------- evaluation loop


def test_evaluation_split_over_ranks_merges_to_the_single_run(small_games):
    # One step per episode: the treasure hunts (one-step walkthroughs) are won, the coin hunts (two steps) are not.
    options = dict(num_episodes=6, num_envs=3, max_episode_turns=1, prompt_config=PromptConfig(), progress=False)
    single = evaluate(WalkthroughAgent(), small_games, **options)
    ranks = [evaluate(WalkthroughAgent(), small_games, rank=r, world_size=2, **options) for r in range(2)]
    report = single.report
    assert report["episodes"] == 6 and report["win_rate"] == pytest.approx(2 / 6)
    assert [row["episodes"] for row in report["games"]] == [2, 2, 1, 1]
    assert [row["win_rate"] for row in report["games"]] == [0.0, 0.0, 1.0, 1.0]
    assert [row["game"] for row in report["games"]] == [game_name(g) for g in small_games]
    assert_same_report(merge_reports([r.report for r in ranks]), report)

    def turns(transcripts):
        return sorted((t["episode"], t["game"], t["command"], t["won"]) for t in transcripts)

    assert turns(ranks[0].transcripts + ranks[1].transcripts) == turns(single.transcripts)
    assert [t["episode"] for t in single.transcripts] == [0, 1, 2, 3, 4, 5]
    assert all(t["done"] and t["turn"] == 1 and t["prompt"] == t["prompt"].strip() for t in single.transcripts)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        evaluate(ModelAgent(None, None, GenerationConfig()), small_games, **options)


def others_playing_for(rounds: int):
    """A stand-in for an all-reduce: the other processes keep playing for `rounds` more loop iterations."""
    left = [rounds]

    def sync_active(playing: bool) -> bool:
        if playing:
            return True
        left[0] -= 1
        return left[0] >= 0

    return sync_active


def test_evaluation_keeps_in_step_with_other_processes(tiny_games, monkeypatch):
    """With `sync_active`, a process that ran out of episodes keeps calling its agent while others still play."""
    class CountingAgent(WalkthroughAgent):
        idle_calls = 0

        def act(self, states, prompts):
            self.idle_calls += all(s is None for s in states)
            return super().act(states, prompts)

    options = dict(num_envs=2, max_episode_turns=3, prompt_config=PromptConfig(), progress=False)
    agent = CountingAgent()
    result = evaluate(agent, tiny_games, num_episodes=2, sync_active=others_playing_for(3), **options)
    assert agent.idle_calls == 3
    assert result.report["episodes"] == 2 and result.report["win_rate"] == 1.0
    # A rank without any episode (1 episode, 2 ranks) follows along too.
    idle = CountingAgent()
    empty = evaluate(idle, tiny_games, num_episodes=1, rank=1, world_size=2, sync_active=others_playing_for(2),
                     **options)
    assert idle.idle_calls == 2 and empty.report["episodes"] == 0 and empty.transcripts == []

    # Under ZeRO-3 an idle model agent still joins the generate call.
    calls = []
    monkeypatch.setattr("lib.agents.generate", lambda model, tokenizer, prompts, config, **_: calls.append(prompts))
    tokenizer = type("Tokenizer", (), {"pad_token": "<pad>"})()
    synced = ModelAgent(None, tokenizer, GenerationConfig(), synced_gpus=True)
    assert synced.act([None, None], [None, None]) == [None, None] and calls == [["<pad>"]]
    assert ModelAgent(None, tokenizer, GenerationConfig()).act([None], [None]) == [None] and len(calls) == 1


# ---------------------------------------------------------------- play.py


def test_play_random_end_to_end(small_games, tmp_path):
    out = tmp_path / "random"
    result = run_play("--agent", "random", "--games", ",".join(small_games), "--num_episodes", "8", "--num_envs", "4",
                      "--max_episode_turns", "10", "--output_dir", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "all (random)" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["agent"] == "random" and report["episodes"] == 8
    assert [row["episodes"] for row in report["games"]] == [2, 2, 2, 2]
    assert report["invalid_rate"] == 0.0 and 0 < report["mean_steps"] <= 10
    assert report["args"]["num_envs"] == 4
    assert report["settings_source"] == dict.fromkeys(play.TRAINING_SETTINGS, "default")
    transcripts = load_from_disk(str(out / "transcripts"))
    assert set(transcripts.column_names) == TRANSCRIPT_COLUMNS
    assert len(transcripts) == round(report["mean_steps"] * report["episodes"])
    assert sum(transcripts["done"]) == 8


def test_play_walkthrough_from_yaml_wins_every_game(small_games, tmp_path):
    out = tmp_path / "walkthrough"
    config = tmp_path / "play.yaml"
    config.write_text(f"agent: walkthrough\ngames: {','.join(small_games)}\noutput_dir: {out}\nnum_envs: 2\n")
    result = run_play(str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == len(small_games)
    assert report["win_rate"] == report["normalized_score"] == 1.0 and report["invalid_rate"] == 0.0
    assert all(row["win_rate"] == 1.0 for row in report["games"])
    transcripts = load_from_disk(str(out / "transcripts"))
    assert len(transcripts) == sum(1 for _ in transcripts) == round(report["mean_steps"] * len(small_games))
    assert all(transcripts["won"][i] for i in range(len(transcripts)) if transcripts["done"][i])


def test_play_model_agent(tiny_model_path, tiny_games, tmp_path, capsys, monkeypatch):
    pushed = []
    monkeypatch.setattr(play.Dataset, "push_to_hub", lambda dataset, repo_id: pushed.append((repo_id, len(dataset))))
    monkeypatch.setattr(play, "check_push_flag", lambda repo_id: None)  # no Hub here: pushing is faked
    out = tmp_path / "model"
    code = play.main(["--agent", "model", "--action_mode", "generate", "--model_name_or_path", tiny_model_path,
                      "--games", ",".join(tiny_games), "--num_episodes", "3", "--max_episode_turns", "3",
                      "--max_new_tokens", "4", "--output_dir", str(out), "--push_to_hub", "someone/transcripts"])
    assert code == 0
    assert "all (model)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["agent"] == "model" and report["episodes"] == 3
    transcripts = load_from_disk(str(out / "transcripts"))
    assert set(transcripts.column_names) == TRANSCRIPT_COLUMNS
    assert len(transcripts) == round(report["mean_steps"] * 3)
    assert pushed == [("someone/transcripts", len(transcripts))]
    assert all(p.endswith("<|im_start|>assistant\n") for p in transcripts["prompt"])
    assert transcripts["command"] == [parse_command(text) for text in transcripts["response"]]
    # Memory: from the second turn of an episode on, the prompt shows the earlier command.
    first_turns = {t["episode"]: t["prompt"].count("<|im_start|>user") for t in transcripts if t["turn"] == 1}
    second = [t for t in transcripts if t["turn"] == 2]
    assert second and all(t["prompt"].count("<|im_start|>user") == first_turns[t["episode"]] + 1 for t in second)


def test_play_human_agent(tiny_games, tmp_path, monkeypatch, capsys):
    typed = iter(["take coin", "look", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    out = tmp_path / "human"
    code = play.main(["--agent", "human", "--games", ",".join(tiny_games), "--output_dir", str(out)])
    assert code == 0
    shown = capsys.readouterr().out
    assert "*** episode won: score 1/1 in 1 steps" in shown and "all (human)" in shown
    report = json.loads((out / "report.json").read_text())
    # The second episode was quit after one command: only the finished one counts.
    assert report["episodes"] == 1 and report["win_rate"] == 1.0
    assert [row["episodes"] for row in report["games"]] == [1, 0]
    assert load_from_disk(str(out / "transcripts"))["command"] == ["take coin", "look"]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--agent", "robot"], "--agent"),
        (["--games", "{missing}"], "--games"),
        (["--num_envs", "0"], "--num_envs"),
        (["--num_episodes", "-1"], "--num_episodes"),
        (["--output_dir", "{file}"], "--output_dir"),
        (["--push_to_hub", "me/my/data"], "--push_to_hub"),
        (["--push_to_hub", "bad--name"], "--push_to_hub"),
        (["--agent", "model", "--model_name_or_path", "{missing_dir}"], "--model_name_or_path"),
        (["--agent", "model", "--dtype", "int3"], "--dtype"),
        (["--max_prompt_tokens", "8"], "max_prompt_tokens"),
        (["--context", "episode", "--mark_tried"], "--mark_tried"),
        (["{missing_yaml}"], "config file not found"),
    ],
)
def test_play_bad_input_fails_before_loading_anything(args, flag, tiny_games, tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded a model or games despite bad flags")

    monkeypatch.setattr(play, "load_model", forbidden)
    monkeypatch.setattr(play, "load_tokenizer", forbidden)
    monkeypatch.setattr(play, "resolve_games", forbidden)
    (tmp_path / "a-file").write_text("")
    paths = {"missing": tmp_path / "missing.z8", "file": tmp_path / "a-file", "missing_dir": tmp_path / "no-model",
             "missing_yaml": tmp_path / "missing.yaml"}
    argv = [a.format(**paths) for a in args]
    if "--games" not in argv and not argv[-1].endswith(".yaml"):
        argv += ["--games", ",".join(tiny_games)]
    assert play.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert flag in error


def test_play_bad_input_exit_code_from_the_command_line(tmp_path):
    start = time.monotonic()
    result = run_play("--agent", "random", "--games", str(tmp_path / "missing.z8"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --games: game file not found: {tmp_path / 'missing.z8'}"
    assert time.monotonic() - start < 60
