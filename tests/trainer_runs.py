"""Running the trainer scripts in tests: flags, a run that must succeed, a run killed with SIGKILL after a checkpoint
and resumed, and the comparison of two runs that must be the same (weights, trainer state, rollout rows, metrics)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lib.models import newest_checkpoint
from lib.rollout import load_rollouts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from plot_curves import read_scalars  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_NeverPrintedOrSaved0123456789"  # a Hub token in the environment must not end up in any output
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_TOKEN": TOKEN}


def flags(**values) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


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
