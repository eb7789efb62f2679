"""Reliability of the trainers: a run killed with SIGKILL and resumed ends exactly like the run never interrupted
(weights, logged metrics, rollout rows); the same seed gives the same run; NaN or inf updates are skipped, and too
many in a row stop the run with the last checkpoint intact."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_loadable_training_state
import torch
from safetensors.torch import load_file

from lib.models import newest_checkpoint
from lib.rollout import load_rollouts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from plot_curves import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_NeverPrintedOrSaved0123456789"  # a Hub token in the environment must not end up in any output
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_TOKEN": TOKEN}
PPO_ITERATIONS, RS_ROUNDS = 5, 4


def flags(**values) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def ppo_args(model, games, output) -> list[str]:
    return flags(
        model_name_or_path=model, train_games=",".join(games), eval_games=",".join(games), output_dir=output,
        num_iterations=PPO_ITERATIONS, num_envs=2, turns_per_slot=3, num_minibatches=3, gradient_accumulation_steps=1,
        max_episode_turns=4, eval_episodes=2, eval_every=2, save_every=1, save_total_limit=0, max_candidates=3,
        length_normalize=True, temperature=4, trainable_layers_fraction=0.5, learning_rate=1e-3, progress=False,
    )


def rs_args(model, games, output) -> list[str]:
    return flags(
        model_name_or_path=model, train_games=",".join(games), eval_games=",".join(games), output_dir=output,
        num_rounds=RS_ROUNDS, episodes_per_round=4, num_envs=2, max_episode_turns=3, eval_episodes=2,
        train_batch_size=4, learning_rate=1e-3, trainable_layers_fraction=0.5, save_total_limit=0, progress=False,
        report_to="tensorboard", action_mode="generate", max_new_tokens=4, temperature=2,
    )


def run(script: str, args: list[str], python=(sys.executable,)) -> str:
    result = subprocess.run([*python, script, *args], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def run_killed_then_resumed(script: str, args: list[str], last_step: int, seed: int) -> None:
    """Start the run, SIGKILL it at a random moment after a random checkpoint is complete, then resume it."""
    rng = random.Random(seed)
    # Within the next iteration or round: a tiny one takes about 0.35 s on a quiet 2-core machine, so a longer delay
    # could reach the end of the run.
    wait_for, delay = rng.randint(1, last_step - 2), rng.uniform(0.0, 0.25)
    output = Path(args[args.index("--output_dir") + 1])
    process = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (output / "checkpoints" / f"checkpoint-{wait_for}").is_dir():
        assert process.poll() is None, f"the run ended before checkpoint-{wait_for} (exit {process.returncode})"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, f"the run finished within {delay:.2f} s of checkpoint-{wait_for}: nothing to resume"
    os.killpg(process.pid, signal.SIGKILL)  # the game processes too, as a dying machine would
    process.wait()
    assert not (output / "checkpoints" / f"checkpoint-{last_step}").exists()
    log = run(script, [*args, "--resume_from_checkpoint", "latest"])
    assert "resumed from" in log


def assert_same_run(first: Path, second: Path, step_key: str, prefix: str) -> None:
    for name in ("model.safetensors", "value_head.safetensors"):
        if (first / name).exists():
            a, b = load_file(first / name), load_file(second / name)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    states = [json.loads((newest_checkpoint(run) / "trainer_state.json").read_text()) for run in (first, second)]
    for state in states:
        state.pop("wall_time_s")
    assert states[0] == states[1]
    rows = [load_rollouts(run, prefix=prefix).to_list() for run in (first, second)]
    assert len(rows[0]) == len(rows[1])
    keys = [(row[step_key], row["process"], row.get("slot"), row["episode"], row["turn"]) for row in rows[1]]
    assert len(set(keys)) == len(keys), "duplicated rollout rows"
    for a, b in zip(rows[0], rows[1]):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], abs=1e-5), key
            else:
                assert a[key] == b[key], key
    scalars = [read_scalars(run / "runs") for run in (first, second)]
    assert scalars[0].keys() == scalars[1].keys()
    for key in scalars[0]:
        if key.startswith("perf/"):  # timings
            continue
        assert scalars[0][key].keys() == scalars[1][key].keys(), key
        for step, value in scalars[0][key].items():
            assert value == pytest.approx(scalars[1][key][step], abs=1e-5, nan_ok=True), f"{key} at step {step}"


@pytest.fixture(scope="module")
def uninterrupted_ppo(tiny_model_path, tiny_games, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("ppo") / "uninterrupted"
    run("ppo_textworld.py", ppo_args(tiny_model_path, tiny_games, output))
    return output


def test_outputs_hold_no_pickle_to_run_and_no_token(uninterrupted_ppo):
    """Weights are safetensors; the rest of a checkpoint is JSON or what accelerate reloads with weights_only=True
    (optimizer, RNG states): no object that unpickling would run. The Hub token appears nowhere."""
    files = [path for path in uninterrupted_ppo.rglob("*") if path.is_file()]
    assert not [path for path in files if path.name.startswith("custom_checkpoint")]
    weights = [path for path in files if path.suffix in (".safetensors", ".bin", ".pt", ".pth", ".pkl")]
    assert {path.name for path in weights if path.suffix != ".safetensors"} <= {"optimizer.bin", "random_states_0.pkl"}
    assert not [path for path in files if TOKEN.encode() in path.read_bytes()]
    for script in ("ppo_textworld", "rejection_sampling", "play"):
        module = __import__(script)
        classes = [getattr(module, name) for name in ("RunArguments", "Args") if hasattr(module, name)]
        assert all(cls.trust_remote_code is False for cls in classes), script


def test_ppo_same_seed_same_run(uninterrupted_ppo, tiny_model_path, tiny_games, tmp_path):
    again = tmp_path / "again"
    run("ppo_textworld.py", ppo_args(tiny_model_path, tiny_games, again))
    assert_same_run(uninterrupted_ppo, again, "iteration", "iteration")


@pytest.mark.parametrize("kill_seed", [0])
def test_ppo_killed_and_resumed_equals_uninterrupted(kill_seed, uninterrupted_ppo, tiny_model_path, tiny_games, tmp_path):
    resumed = tmp_path / "resumed"
    run_killed_then_resumed("ppo_textworld.py", ppo_args(tiny_model_path, tiny_games, resumed), PPO_ITERATIONS, kill_seed)
    assert_same_run(uninterrupted_ppo, resumed, "iteration", "iteration")


def test_ppo_episode_context_killed_and_resumed_equals_uninterrupted(tiny_model_path, tiny_games, tmp_path):
    """--context episode: streams start with each iteration, so a resumed run rebuilds them from the replayed turns
    and ends as the uninterrupted run does."""
    def episode_args(output):
        args = ppo_args(tiny_model_path, tiny_games, output)
        args[args.index("--num_minibatches") + 1] = "2"  # a micro-batch holds whole streams: at most one per slot
        return args + flags(context="episode", max_context_tokens=600)

    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run("ppo_textworld.py", episode_args(uninterrupted))
    run_killed_then_resumed("ppo_textworld.py", episode_args(resumed), PPO_ITERATIONS, 1)
    assert_same_run(uninterrupted, resumed, "iteration", "iteration")
    assert load_rollouts(resumed)["stream_offset"][0] == 0


def test_rejection_sampling_killed_and_resumed_equals_uninterrupted(tiny_model_path, tiny_games, tmp_path):
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run("rejection_sampling.py", rs_args(tiny_model_path, tiny_games, uninterrupted))
    run_killed_then_resumed("rejection_sampling.py", rs_args(tiny_model_path, tiny_games, resumed), RS_ROUNDS, 1)
    assert_same_run(uninterrupted, resumed, "round", "round")


# A PPO run whose loss is NaN in the optimizer steps first_bad..last_bad (6 steps per iteration with ppo_args: 2 epochs
# of 3 minibatches of one micro-batch each).
POISONED = """
import sys
import ppo_textworld
from lib.training import NonFiniteError

first_bad, last_bad = int(sys.argv[1]), int(sys.argv[2])
real, calls = ppo_textworld.candidate_ppo_loss, [0]


def poisoned(*args, **kwargs):
    loss, stats = real(*args, **kwargs)
    calls[0] += 1
    return (loss * float("nan"), stats) if first_bad <= calls[0] <= last_bad else (loss, stats)


ppo_textworld.candidate_ppo_loss = poisoned
try:
    ppo_textworld.main(sys.argv[3:])
except NonFiniteError as error:
    sys.exit(f"error: {error}")
"""


def test_a_nan_loss_skips_its_update_and_the_run_goes_on(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    args = ["2", "2", *ppo_args(tiny_model_path, tiny_games, output), "--num_iterations", "2"]
    log = run("-c", [POISONED, *args])
    assert "warning: NaN or inf in the loss or gradient at iteration 1: optimizer step skipped (1 in a row)" in log
    assert read_scalars(output / "runs")["losses/skipped_updates"] == {1: 1.0, 2: 1.0}
    weights = load_file(output / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_nan_updates_in_a_row_stop_the_run_with_the_last_checkpoint_intact(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    args = ["7", "10_000", *ppo_args(tiny_model_path, tiny_games, output), "--max_nonfinite_updates", "3"]
    result = subprocess.run([sys.executable, "-c", POISONED, *args], cwd=ROOT, capture_output=True, text=True, env=ENV,
                            timeout=600)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 3 updates in a row met a NaN or inf") and "--resume_from_checkpoint latest" in message
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-1"]
    weights = load_file(output / "checkpoints" / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    # ... and the run resumes from it once the cause is gone.
    log = run("ppo_textworld.py", [*ppo_args(tiny_model_path, tiny_games, output), "--num_iterations", "2",
                                   "--resume_from_checkpoint", "latest"])
    assert "resumed from" in log and (output / "checkpoints" / "checkpoint-2").is_dir()


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    """A crash while saving leaves .tmp-checkpoint-N: `latest` still names the last complete checkpoint."""
    from lib.training import find_resume_checkpoint

    complete = tmp_path / "checkpoints" / "checkpoint-1"
    write_loadable_training_state(complete / "training_state")
    (complete / "config.json").write_text("{}")
    (complete / "trainer_state.json").write_text(json.dumps({"iteration": 1}))
    (tmp_path / "checkpoints" / ".tmp-checkpoint-2" / "training_state").mkdir(parents=True)
    assert newest_checkpoint(tmp_path) == complete
    assert find_resume_checkpoint("latest", str(tmp_path), "iteration", 5, "--num_iterations", {}, 1) == complete


def test_a_tokenizer_without_pad_token_pads_with_eos(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    from lib.models import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(Path(tiny_model_path) / "config.json", tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "left"
