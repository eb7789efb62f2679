"""play.py plays a trained model with the prompt and scoring settings of its training run (training_args.json), flags
given on the command line or in a YAML file winning over them."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from datasets import load_from_disk

import play
from lib.training import ARGS_FILE

# What a trainer wrote: settings play.py takes (unlike its own defaults) and flags it must not take (seed, num_envs).
TRAINED = {"memory_turns": 1, "max_new_tokens": 10, "num_examples": 1, "max_candidates": 5, "action_mode": "generate",
           "hint": False}
OTHER_TRAINING_FLAGS = {"seed": 3, "num_envs": 2, "learning_rate": 1e-5, "reward": "score,win,invalid"}
PLAY_DEFAULTS = play.Args()


def write_training_args(folder: Path, values: dict) -> Path:
    (folder / ARGS_FILE).write_text(json.dumps(values, indent=2))
    return folder / ARGS_FILE


@pytest.fixture
def trained_model(tiny_model_path, tmp_path) -> Path:
    """A training output folder: the tiny model at its root with the training_args.json a trainer writes."""
    folder = Path(shutil.copytree(tiny_model_path, tmp_path / "ppo"))
    write_training_args(folder, {**TRAINED, **OTHER_TRAINING_FLAGS})
    return folder


def settings(argv: list[str]):
    """(args, training_args.json read or None, sources) as play.main resolves them before loading anything."""
    args = play.parse_args(argv)
    play.check_args(args)
    return play.with_training_settings(args, play.fields_given(argv))


def chosen(args: play.Args) -> dict:
    return {name: getattr(args, name) for name in play.TRAINING_SETTINGS}


def test_training_settings_become_the_defaults(trained_model):
    args, path, sources = settings(["--model_name_or_path", str(trained_model)])
    assert path == trained_model / ARGS_FILE
    assert chosen(args) == {**chosen(PLAY_DEFAULTS), **TRAINED}
    assert sources == {name: ARGS_FILE if name in TRAINED else "default" for name in play.TRAINING_SETTINGS}
    # Only the prompt and scoring settings: the run's seed, slots and training flags stay out.
    assert (args.seed, args.num_envs) == (PLAY_DEFAULTS.seed, PLAY_DEFAULTS.num_envs)


def test_settings_come_from_the_checkpoint_that_loads(trained_model, tiny_model_path):
    """Without a final model at the root, the newest checkpoint loads, and its own training_args.json applies."""
    (trained_model / "config.json").unlink()
    for step, memory_turns in ((2, 0), (4, 2)):
        checkpoint = Path(shutil.copytree(tiny_model_path, trained_model / "checkpoints" / f"checkpoint-{step}"))
        write_training_args(checkpoint, {**TRAINED, "memory_turns": memory_turns})
    args, path, _ = settings(["--model_name_or_path", str(trained_model)])
    assert path == trained_model / "checkpoints" / "checkpoint-4" / ARGS_FILE
    assert args.memory_turns == 2 and args.max_new_tokens == TRAINED["max_new_tokens"]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--memory_turns", "4"], {"memory_turns": 4}),
        (["--memory_turns=4", "--max_candidates", "7"], {"memory_turns": 4, "max_candidates": 7}),
        # play.py's own default, given on purpose, still beats the file
        (["--memory_turns", "3", "--action_mode", "score"], {"memory_turns": 3, "action_mode": "score"}),
        (["--hint"], {"hint": True}),
        (["--no_hint", "--max_candidates=7"], {"hint": False, "max_candidates": 7}),
        (["--hint", "True", "--length_normalize", "false"], {"hint": True, "length_normalize": False}),
        (["--memory-turns", "0"], {"memory_turns": 0}),
    ],
)
def test_flags_on_the_command_line_win(trained_model, flags, expected):
    args, _, sources = settings(["--model_name_or_path", str(trained_model), *flags])
    assert chosen(args) == {**chosen(PLAY_DEFAULTS), **TRAINED, **expected}
    assert {name for name, source in sources.items() if source == "command line"} == set(expected)
    assert {name for name, source in sources.items() if source == ARGS_FILE} == set(TRAINED) - set(expected)


def test_keys_of_a_yaml_config_win_and_flags_after_it_too(trained_model, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text(f"model_name_or_path: {trained_model}\nmemory_turns: 4\nhint: true\nmax_candidates: 6\n")
    args, _, sources = settings([str(config), "--max_candidates", "9"])
    assert chosen(args) == {**chosen(PLAY_DEFAULTS), **TRAINED, "memory_turns": 4, "hint": True, "max_candidates": 9}
    assert sources["memory_turns"] == sources["hint"] == sources["max_candidates"] == "command line"
    assert sources["max_new_tokens"] == ARGS_FILE


def test_a_model_without_training_args_keeps_the_play_defaults(tiny_model_path, trained_model):
    assert not (Path(tiny_model_path) / ARGS_FILE).exists()
    args, path, sources = settings(["--model_name_or_path", tiny_model_path, "--max_candidates", "7"])
    assert path is None
    assert chosen(args) == {**chosen(PLAY_DEFAULTS), "max_candidates": 7}
    assert sources == {**dict.fromkeys(play.TRAINING_SETTINGS, "default"), "max_candidates": "command line"}
    # Only the model agent plays under a training run's settings.
    args, path, sources = settings(["--agent", "random", "--model_name_or_path", str(trained_model)])
    assert path is None and asdict(args) == {**asdict(PLAY_DEFAULTS), "agent": "random",
                                             "model_name_or_path": str(trained_model)}
    assert set(sources.values()) == {"default"}


def test_deprecated_flag_is_renamed_with_a_warning(capsys):
    argv = ["--max_episode_steps", "5"]
    assert play.parse_args(argv).max_episode_turns == 5 and play.fields_given(argv) == {"max_episode_turns"}
    assert capsys.readouterr().err.count("--max_episode_steps is deprecated") == 1


def test_play_reports_which_settings_it_used(trained_model, tiny_games, tmp_path, capsys):
    out = tmp_path / "eval"
    code = play.main(["--model_name_or_path", str(trained_model), "--games", ",".join(tiny_games), "--num_episodes",
                      "2", "--max_episode_turns", "3", "--max_candidates", "3", "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert (f"settings from {trained_model / ARGS_FILE}: memory_turns=1, num_examples=1, hint=False, "
            "action_mode=generate, max_new_tokens=10 (command line: max_candidates)") in printed
    report = json.loads((out / "report.json").read_text())
    assert report["settings_source"] == {
        **dict.fromkeys(play.TRAINING_SETTINGS, "default"), **dict.fromkeys(TRAINED, ARGS_FILE),
        "max_candidates": "command line",
    }
    assert report["agent"] == "model" and report["args"]["action_mode"] == "generate"  # generate mode, from the file
    assert report["args"]["memory_turns"] == 1 and report["args"]["max_candidates"] == 3
    # The prompts were built with the file's settings: one past turn, no hint list.
    transcripts = load_from_disk(str(out / "transcripts"))
    user_messages = {}  # per episode, per turn in the order played
    for turn in transcripts:
        user_messages.setdefault(turn["episode"], []).append(turn["prompt"].count("<|im_start|>user"))
    assert any(len(counts) == 3 for counts in user_messages.values())
    assert all(counts[1:] == [counts[0] + 1] * (len(counts) - 1) for counts in user_messages.values())
    assert not any("Possible actions:" in prompt for prompt in transcripts["prompt"])


@pytest.mark.parametrize(
    "content, named",
    [
        ("{not json", "not valid JSON"),
        ('["memory_turns", 1]', "not an object"),
        (json.dumps({**TRAINED, "max_new_tokens": 0}), "max_new_tokens"),
        (json.dumps({**TRAINED, "action_mode": "beam"}), "action_mode"),
        (json.dumps({**TRAINED, "memory_turns": "1"}), "memory_turns"),
        (json.dumps({**TRAINED, "hint": 1}), "hint"),
        (json.dumps({**TRAINED, "max_prompt_tokens": 8}), "max_prompt_tokens"),
    ],
)
def test_bad_training_args_fail_before_the_model_loads(trained_model, tiny_games, content, named, monkeypatch,
                                                       capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded the model or the games despite a bad training_args.json")

    monkeypatch.setattr(play, "load_model", forbidden)
    monkeypatch.setattr(play, "load_tokenizer", forbidden)
    monkeypatch.setattr(play, "resolve_games", forbidden)
    path = write_training_args(trained_model, {})
    path.write_text(content)
    assert play.main(["--model_name_or_path", str(trained_model), "--games", ",".join(tiny_games)]) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert str(path) in error and named in error
    assert "settings from" not in captured.out


def test_a_model_trained_with_episode_context_plays_with_it(trained_model, tiny_games, tmp_path):
    from lib.agents import EpisodeScoringAgent

    write_training_args(trained_model, {**TRAINED, "action_mode": "score", "context": "episode",
                                        "max_context_tokens": 600})
    argv = ["--model_name_or_path", str(trained_model)]
    args, _, sources = settings(argv)
    assert (args.context, args.max_context_tokens) == ("episode", 600) and sources["context"] == ARGS_FILE
    assert isinstance(play.make_agent(args, play.load_tokenizer(str(trained_model))), EpisodeScoringAgent)
    out = tmp_path / "eval"
    assert play.main([*argv, "--games", ",".join(tiny_games), "--num_episodes", "2", "--max_episode_turns", "3",
                      "--output_dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["args"]["context"] == "episode" and report["episodes"] == 2
