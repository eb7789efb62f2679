"""The trainers on TextWorldExpress and ScienceWorld games (real engines, the tiny model): one PPO iteration in each
action mode and one rejection-sampling round, on a mixture whose two slots play one engine each."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lib.rollout import load_rollouts

ROOT = Path(__file__).resolve().parents[1]
MIXTURE = "twx-coin:numLocations=3:n=1,sciworld-find-living-thing:simplify=easy:n=1"


def run(script: str, flags: dict) -> str:
    args = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("action_mode", ["score", "generate"])
def test_a_ppo_iteration_on_both_engines(action_mode, tiny_model_path, games_cache, tmp_path):
    output = tmp_path / "ppo"
    log = run("ppo_textworld.py", {
        "model_name_or_path": tiny_model_path, "train_games": MIXTURE, "eval_games": "twx-coin:numLocations=3:n=1",
        "output_dir": output, "games_dir": games_cache, "num_iterations": 1, "num_envs": 2, "turns_per_slot": 2,
        "num_minibatches": 2, "gradient_accumulation_steps": 1, "max_new_tokens": 4, "max_episode_turns": 3,
        "eval_episodes": 1, "max_candidates": 3, "trainable_layers_fraction": 0.5, "progress": False,
        "report_to": "none", "action_mode": action_mode,
    })
    assert "after training:" in log
    assert (output / "checkpoints" / "checkpoint-1" / "model.safetensors").exists()
    rows = load_rollouts(output)
    assert sorted(set(zip(rows["env"], rows["game"]))) == [
        ("sciworld", "sciworld:find-living-thing:0:easy"), ("twx", "twx:coin:train:0:numLocations=3"),
    ]
    assert all(0 <= score <= max_score == 1.0 for score, max_score in zip(rows["score"], rows["max_score"]))


def test_a_rejection_sampling_round_on_both_engines(tiny_model_path, games_cache, tmp_path):
    output = tmp_path / "rs"
    run("rejection_sampling.py", {
        "model_name_or_path": tiny_model_path, "train_games": MIXTURE, "eval_games": "twx-coin:numLocations=3:n=1",
        "output_dir": output, "games_dir": games_cache, "num_rounds": 1, "episodes_per_round": 2, "num_envs": 2,
        "max_episode_turns": 3, "eval_episodes": 1, "max_new_tokens": 4, "train_batch_size": 2,
        "learning_rate": 1e-3, "trainable_layers_fraction": 0.5, "progress": False, "report_to": "none",
    })
    rows = load_rollouts(output, prefix="round")
    assert set(rows["env"]) == {"twx", "sciworld"}
