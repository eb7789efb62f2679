"""Bad inputs to the scripts, run as a user would: each exits non-zero before any model weights are loaded or any
game is generated, with one `error:` line that names the problem (the flag or the path) and the fix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PPO, RS, PLAY = "ppo_textworld.py", "rejection_sampling.py", "play.py"

# (script, flags, substrings the error must hold, add the common flags). {tmp} is the test's tmp_path.
CASES = {
    "missing game file": (PPO, ["--train_games", "{tmp}/missing.z8"], ["--train_games", "game file not found", "{tmp}/missing.z8"], True),
    "corrupt game file": (PPO, ["--train_games", "{tmp}/garbage.z8"], ["--train_games", "{tmp}/garbage.z8", "corrupt", "regenerate it or pass another file"], True),
    "text file, not a game": (PPO, ["--eval_games", "{tmp}/notes.txt"], ["--eval_games", "{tmp}/notes.txt", "is not a game file", ".z8 or .ulx"], True),
    "empty game folder": (RS, ["--train_games", "{tmp}/empty"], ["--train_games", "{tmp}/empty", "holds no game files", "pass another folder"], True),
    "unknown game kind": (PPO, ["--train_games", "tw-nope:n=2"], ["--train_games", "'tw-nope'", "known kinds: tw-simple"], True),
    "level out of range": (PPO, ["--train_games", "tw-coin_collector:level=999"], ["--train_games", "level=999", "out of range [1, 300]"], True),
    "unknown game option": (PPO, ["--train_games", "tw-coin_collector:size=3"], ["--train_games", "unknown option 'size'", "options: n, level"], True),
    "bad YAML syntax": (PPO, ["{tmp}/bad.yaml"], ["config file {tmp}/bad.yaml", "not valid YAML", "fix its syntax"], False),
    "missing YAML config": (RS, ["{tmp}/missing.yaml"], ["config file not found: {tmp}/missing.yaml", "check the path"], False),
    "unknown flag": (PPO, ["--no_such_flag", "1"], ["unknown flag", "--no_such_flag", "see --help"], True),
    "contradictory keep rules": (RS, ["--keep_top_percent", "10", "--keep_top_n", "3"], ["--keep_top_percent and --keep_top_n", "pass one of them"], True),
    "batch not divisible by minibatches": (PPO, ["--num_envs", "3", "--turns_per_slot", "1"], ["turns_per_slot = 3 turns", "divisible by --num_minibatches 2"], True),
    "accumulation not dividing the minibatch": (PPO, ["--gradient_accumulation_steps", "3"], ["minibatch (32 turns)", "divisible by --gradient_accumulation_steps 3"], True),
    "zero learning rate": (PPO, ["--learning_rate", "0"], ["--learning_rate must be positive", "got 0.0"], True),
    "negative learning rate (rejection sampling)": (RS, ["--learning_rate=-1e-5"], ["--learning_rate must be positive"], True),
    "zero clip range": (PPO, ["--clip_range", "0"], ["--clip_range must be positive", "got 0.0"], True),
    "missing model path": (PPO, ["--model_name_or_path", "/nonexistent"], ["--model_name_or_path", "not found: /nonexistent", "pass an existing folder"], True),
    "output dir is a file": (PPO, ["--output_dir", "{tmp}/a_file"], ["--output_dir {tmp}/a_file is a file", "pass another --output_dir"], True),
    "resume from a missing checkpoint": (PPO, ["--resume_from_checkpoint", "{tmp}/no_checkpoint"], ["--resume_from_checkpoint {tmp}/no_checkpoint", "not a training checkpoint", "checkpoint-N folder or `latest`"], True),
    "resume latest without a checkpoint": (RS, ["--resume_from_checkpoint", "latest"], ["--resume_from_checkpoint latest: no checkpoint", "drop the flag"], True),
    "malformed hub repo id": (PPO, ["--push_to_hub", "bad id!!"], ["--push_to_hub 'bad id!!' is not a repo id", "owner/name"], True),
    "keep_top_percent above 100": (RS, ["--keep_top_percent", "150"], ["--keep_top_percent must be in (0, 100]", "got 150.0"], True),
    "keep_top_percent zero": (RS, ["--keep_top_percent", "0"], ["--keep_top_percent must be in (0, 100]", "got 0.0"], True),
    "unknown reward name": (PPO, ["--reward", "score,bogus"], ["--reward", "'bogus'", "comma list of: score, win"], True),
    "unknown tracker": (PPO, ["--report_to", "nope"], ["--report_to 'nope' is unknown", "choose one of tensorboard"], True),
    "unknown action mode": (RS, ["--action_mode", "beam"], ["--action_mode 'beam' is unknown", "choose one of generate, score"], True),
    "model folder without a tokenizer": (PPO, ["--model_name_or_path", "{tmp}/no_tokenizer"], ["--model_name_or_path {tmp}/no_tokenizer has no tokenizer", "tokenizer.save_pretrained"], True),
    "resume from a checkpoint of other flags": (PPO, ["--resume_from_checkpoint", "{tmp}/other_flags"], ["{tmp}/other_flags was written with --num_envs 4", "this run has --num_envs 8", "resume with the interrupted run's values"], True),
    "resume with another number of processes": (RS, ["--resume_from_checkpoint", "{tmp}/two_processes"], ["written by 2 processes, this launch has 1", "same number of processes"], True),
    "empty hub repo id": (RS, ["--push_to_hub", ""], ["--push_to_hub '' is not a repo id"], True),
    "zero max_nonfinite_updates": (PPO, ["--max_nonfinite_updates", "0"], ["--max_nonfinite_updates must be positive"], True),
    "play: corrupt game file": (PLAY, ["--games", "{tmp}/garbage.z8", "--agent", "random"], ["--games", "{tmp}/garbage.z8", "corrupt"], False),
    "play: unknown agent": (PLAY, ["--agent", "nope"], ["--agent 'nope' is unknown", "choose one of random"], False),
    "infinite learning rate": (PPO, ["--learning_rate", "inf"], ["--learning_rate must be a finite number", "got inf"], True),
    "NaN gamma (rejection sampling)": (RS, ["--gamma", "nan"], ["--gamma must be a finite number", "got nan"], True),
    "negative seed": (RS, ["--seed", "-1"], ["--seed must be >= 0", "got -1"], True),
    "play: infinite temperature": (PLAY, ["--agent", "random", "--temperature", "inf"], ["--temperature must be a finite number", "got inf"], False),
    "unknown TextWorldExpress game": (PPO, ["--train_games", "twx-coins:n=2"], ["--train_games", "unknown TextWorldExpress game 'coins'", "known: coin, cookingworld"], True),
    "TextWorldExpress option out of range": (RS, ["--train_games", "twx-coin:numLocations=50"], ["--train_games", "does not start in TextWorldExpress", "less than or equal to 11"], True),
    "play: unknown ScienceWorld task": (PLAY, ["--agent", "random", "--games", "sciworld-boiling"], ["--games", "unknown ScienceWorld task 'boiling'", "known: boil"], False),
}


def write_bad_files(tmp: Path) -> None:
    (tmp / "garbage.z8").write_bytes(b"\x00garbage\xff\x01" * 4)
    (tmp / "notes.txt").write_text("not a game\n")
    (tmp / "empty").mkdir()
    (tmp / "bad.yaml").write_text("num_envs: [1, 2\nlearning_rate: 1e-5\n")
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "no_tokenizer").mkdir()
    (tmp / "no_tokenizer" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for name, state, args in (("other_flags", {"iteration": 1}, {"num_envs": 4}),
                              ("two_processes", {"round": 1, "num_processes": 2}, {})):
        (tmp / name / "training_state").mkdir(parents=True)
        (tmp / name / "trainer_state.json").write_text(json.dumps(state))
        (tmp / name / "training_args.json").write_text(json.dumps(args))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_fast_naming_the_problem_and_the_fix(name, tmp_path):
    script, flags, expected, common = CASES[name]
    write_bad_files(tmp_path)
    fill = lambda text: text.replace("{tmp}", str(tmp_path))  # noqa: E731
    args = [fill(flag) for flag in flags]
    if common:
        args = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", *args]  # the case's own flags win
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "TEXTWORLD_RL_GAMES": str(tmp_path / "games")}  # nothing may be generated, and never into ./games
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert last.startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in expected:
        assert fill(text) in last, f"{fill(text)!r} not in {last!r}"
    # Before any weights load (transformers reports both while loading) and before any game is generated.
    assert "Loading weights" not in result.stderr and "de-quantizing" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "games").exists()


def test_a_missing_accelerate_config_is_named_by_the_launcher(tmp_path):
    """`accelerate launch` itself refuses it, before our script starts."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "none.yaml"), PPO],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert f"configuration file `{tmp_path / 'none.yaml'}` does not exist" in result.stderr
