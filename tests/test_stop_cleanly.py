"""Never lose a user's work: SIGINT (Ctrl-C) or SIGTERM stops every script cleanly, keeping what is finished and
leaving no game process behind; numbers that cannot train are refused before any model loads; a step that makes a
weight non-finite stops the run before those weights are saved."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

import lib.training
import play
import ppo_textworld
import rejection_sampling
from lib.arguments import parse_arguments

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
PPO_ITERATIONS, RS_ROUNDS = 5, 4


def flags(**values) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def ppo_args(model, games, output) -> list[str]:
    """A tiny PPO run: 6 optimizer steps per iteration (2 epochs of 3 minibatches), a checkpoint every iteration."""
    return flags(
        model_name_or_path=model, train_games=",".join(games), eval_games=",".join(games), output_dir=output,
        num_iterations=PPO_ITERATIONS, num_envs=2, turns_per_slot=3, num_minibatches=3, gradient_accumulation_steps=1,
        max_episode_turns=4, eval_episodes=2, eval_every=2, save_every=1, save_total_limit=0, max_candidates=3,
        temperature=4, trainable_layers_fraction=0.5, learning_rate=1e-3, progress=False, report_to="none",
    )


def rs_args(model, games, output) -> list[str]:
    return flags(
        model_name_or_path=model, train_games=",".join(games), eval_games=",".join(games), output_dir=output,
        num_rounds=RS_ROUNDS, episodes_per_round=4, num_envs=2, max_episode_turns=3, eval_episodes=2,
        train_batch_size=4, learning_rate=1e-3, trainable_layers_fraction=0.5, save_total_limit=0, progress=False,
        report_to="none", action_mode="generate", max_new_tokens=4, temperature=2,
    )


# ---------------------------------------------------------------- numbers that cannot train


NON_FINITE = [
    (ppo_textworld, ["--learning_rate", "inf"], "--learning_rate"),
    (ppo_textworld, ["--clip_range", "nan"], "--clip_range"),
    (ppo_textworld, ["--kl_coef=-inf"], "--kl_coef"),
    (ppo_textworld, ["--gamma_turn", "nan"], "--gamma_turn"),
    (ppo_textworld, ["--temperature", "inf"], "--temperature"),
    (ppo_textworld, ["--score_weight", "nan"], "--score_weight"),  # no range of its own: only the generic check
    (rejection_sampling, ["--learning_rate", "nan"], "--learning_rate"),
    (rejection_sampling, ["--min_return", "inf"], "--min_return"),
    (rejection_sampling, ["--keep_top_percent", "nan"], "--keep_top_percent"),
    (rejection_sampling, ["--gamma=-inf"], "--gamma"),
    (play, ["--temperature", "inf"], "--temperature"),
    (play, ["--top_p", "nan"], "--top_p"),
]
NEGATIVE = [
    (ppo_textworld, ["--seed", "-1"], "--seed"),
    (rejection_sampling, ["--seed", "-1"], "--seed"),
    (play, ["--seed", "-1"], "--seed"),
    (ppo_textworld, ["--value_head_hidden_size", "-3"], "--value_head_hidden_size"),
]


def error_line(module, argv: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """The one `error:` line a script's main ends with, any model load failing the test."""
    if module is play:
        monkeypatch.setattr(play, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
        assert play.main(["--agent", "model", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]
    monkeypatch.setattr(lib.training, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--output_dir", str(tmp_path / "out"), "--report_to", "none"])  # a YAML file goes first
    return str(exit_info.value.code)


@pytest.mark.parametrize("module, argv, flag", NON_FINITE,
                         ids=[f"{module.__name__} {' '.join(argv)}" for module, argv, _ in NON_FINITE])
def test_a_non_finite_number_is_refused_naming_its_flag(module, argv, flag, tmp_path, monkeypatch, capsys):
    line = error_line(module, argv, tmp_path, monkeypatch, capsys)
    value = argv[-1].split("=")[-1]
    assert line == f"error: {flag} must be a finite number, got {float(value)}"


@pytest.mark.parametrize("module, argv, flag", NEGATIVE,
                         ids=[f"{module.__name__} {' '.join(argv)}" for module, argv, _ in NEGATIVE])
def test_a_negative_count_or_seed_is_refused_naming_its_flag(module, argv, flag, tmp_path, monkeypatch, capsys):
    line = error_line(module, argv, tmp_path, monkeypatch, capsys)
    assert line.startswith(f"error: {flag} must be >= 0, got -") and "\n" not in line


@pytest.mark.parametrize("module", [ppo_textworld, rejection_sampling])
def test_a_learning_rate_in_yaml_reads_as_a_number(module, tmp_path, monkeypatch, capsys):
    """YAML reads `1e-5` (no dot) as a string: it must still become the float flag, and `-1e-5` the usual range
    error rather than argparse taking it for a flag."""
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-5\n")
    learning_rate = next(group.learning_rate for group in parse_arguments(module.ALL_ARGUMENTS, [str(config)])
                         if hasattr(group, "learning_rate"))
    assert learning_rate == 1e-05 and isinstance(learning_rate, float)
    config.write_text("learning_rate: -1e-5\n")
    assert error_line(module, [str(config)], tmp_path, monkeypatch, capsys).endswith(
        "error: --learning_rate must be positive, got -1e-05")


def test_play_reads_a_yaml_number_without_a_dot(tmp_path):
    config = tmp_path / "play.yaml"
    config.write_text("temperature: 1e-5\ntop_p: -1e-5\n")
    args = play.parse_args([str(config)])
    assert args.temperature == 1e-05 and args.top_p == -1e-05


# ---------------------------------------------------------------- a non-finite weight after an optimizer step


# A PPO run whose optimizer writes a NaN into a trainable weight at one optimizer step (argv[1]).
POISONED_STEP = """
import sys
import torch
import ppo_textworld
from lib.training import main_or_exit

bad_step, build_optimizer = int(sys.argv[1]), ppo_textworld.build_optimizer


def build_poisoned_optimizer(*args, **kwargs):
    optimizer = build_optimizer(*args, **kwargs)
    step, steps = optimizer.step, [0]

    def step_then_poison(*step_args, **step_kwargs):
        result = step(*step_args, **step_kwargs)
        steps[0] += 1
        if steps[0] == bad_step:
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return result

    optimizer.step = step_then_poison
    return optimizer


ppo_textworld.build_optimizer = build_poisoned_optimizer
main_or_exit(lambda argv: ppo_textworld.main(argv[1:]))
"""


def test_a_non_finite_weight_stops_the_run_before_it_is_saved(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    # Step 12: the last of iteration 2, whose checkpoint would otherwise follow at once.
    command = [sys.executable, "-c", POISONED_STEP, "12", *ppo_args(tiny_model_path, tiny_games, output)]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: a non-finite weight after the optimizer step at iteration 2"), message
    assert "Lower --learning_rate (now 0.001)" in message
    assert message.endswith("nothing was saved after checkpoint-1: resume from it with --resume_from_checkpoint latest")
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert not (output / "model.safetensors").exists()
    saved = [path for path in (output / "checkpoints").rglob("*.safetensors")]
    assert len(saved) >= 3  # the policy, the value head, the training state
    for path in saved:
        assert all(torch.isfinite(tensor).all() for tensor in load_file(path).values()), path


# ---------------------------------------------------------------- stop signals: start, stop, check the processes


def start(command: list[str], log_dir: Path) -> subprocess.Popen:
    """The command in the background, its stdout and stderr going to files (a pipe nobody reads would block it)."""
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=open(log_dir / "stdout", "w"),
                            stderr=open(log_dir / "stderr", "w"), text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"the process ended (exit {process.returncode}) before {what}"
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def stop_and_wait(process: subprocess.Popen, signal_number: int, seed: int) -> list[psutil.Process]:
    """After a random delay, send the signal to the script's own process (as `kill` does, not to its group) and wait
    for it to end; returns the processes it had started (its game processes among them)."""
    # Within the next iteration or round of a tiny trainer run (about 0.35 s on a quiet 2-core machine): a longer
    # delay could reach the end of the run.
    time.sleep(random.Random(seed).uniform(0.0, 0.25))
    assert process.poll() is None, "the script finished before the signal: nothing to stop"
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal_number)
    process.wait(timeout=120)
    return descendants


def assert_all_ended(processes: list[psutil.Process], timeout: float = 15) -> None:
    deadline = time.time() + timeout
    alive = processes
    while alive and time.time() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"


# ---------------------------------------------------------------- play.py stopped


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopped_play_writes_the_finished_episodes_marked_partial(signal_number, tiny_games, tmp_path):
    out = tmp_path / "out"
    process = start([sys.executable, "play.py", "--agent", "random", "--games", ",".join(tiny_games),
                     "--num_episodes", "1000000", "--num_envs", "2", "--max_episode_turns", "5",
                     "--output_dir", str(out)], tmp_path)
    wait_for(lambda: len(psutil.Process(process.pid).children(recursive=True)) >= 3, process, "the game processes")
    time.sleep(1.0)  # some episodes finish
    started = stop_and_wait(process, signal_number, seed=signal_number)
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["partial"] is True and 0 < report["episodes"] < 1000000
    overall = [line.split() for line in stdout.splitlines() if line.startswith("all (random, partial)")]
    assert overall and overall[0][3] == str(report["episodes"]), stdout[-2000:]
    name = signal.Signals(signal_number).name
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by {name} after {report['episodes']} of 1000000 episodes"), last_line
    # Only the finished episodes: each one's turns, the last one ending it.
    transcripts = load_from_disk(str(out / "transcripts")).to_list()
    episodes = {}
    for turn in transcripts:
        episodes.setdefault(turn["episode"], []).append(turn)
    assert len(episodes) == report["episodes"]
    for turns in episodes.values():
        assert [t["turn"] for t in turns] == list(range(1, len(turns) + 1))
        assert turns[-1]["done"] and not any(t["done"] for t in turns[:-1])
    assert_all_ended(started)


# ---------------------------------------------------------------- trainers stopped, then resumed


@pytest.mark.parametrize("script, make_args, step_key, last_step, signal_number", [
    ("ppo_textworld.py", ppo_args, "iteration", PPO_ITERATIONS, signal.SIGINT),
    ("rejection_sampling.py", rs_args, "round", RS_ROUNDS, signal.SIGTERM),
], ids=["ppo-SIGINT", "rejection_sampling-SIGTERM"])
def test_a_stopped_trainer_keeps_its_checkpoints_and_resumes(script, make_args, step_key, last_step, signal_number,
                                                             tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "run"
    args = make_args(tiny_model_path, tiny_games, output)
    process = start([sys.executable, script, *args], tmp_path)
    wait_for((output / "checkpoints" / "checkpoint-1").is_dir, process, "checkpoint-1")
    started = stop_and_wait(process, signal_number, seed=signal_number)
    stderr = (tmp_path / "stderr").read_text()
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    name = signal.Signals(signal_number).name
    stop_lines = [line for line in stderr.splitlines() if line.startswith("stopped by")]
    assert stop_lines == [stderr.strip().splitlines()[-1]], stderr[-3000:]
    newest = max(int(path.name.split("-")[1]) for path in (output / "checkpoints").glob("checkpoint-*"))
    assert stop_lines[0].startswith(f"stopped by {name} at {step_key} ")
    assert stop_lines[0].endswith(f"nothing was saved after checkpoint-{newest}: resume from it with "
                                  "--resume_from_checkpoint latest")
    assert_all_ended(started)

    resumed = subprocess.run([sys.executable, script, *args, "--resume_from_checkpoint", "latest"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {output / 'checkpoints' / f'checkpoint-{newest}'}" in resumed.stdout + resumed.stderr
    assert (output / "checkpoints" / f"checkpoint-{last_step}").is_dir() and (output / "model.safetensors").is_file()
