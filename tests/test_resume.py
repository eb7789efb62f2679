"""Reliability of the trainers: a run killed with SIGKILL and resumed ends exactly like the run never interrupted
(weights, logged metrics, rollout rows); the same seed gives the same run; NaN or inf updates are skipped, and too
many in a row stop the run with the last checkpoint intact."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_loadable_training_state
import torch
from safetensors.torch import load_file
from trainer_runs import ENV, ROOT, TOKEN, assert_same_run, flags, run, run_killed_then_resumed

from lib.models import newest_checkpoint
from lib.rollout import load_rollouts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from plot_curves import read_scalars  # noqa: E402

PPO_ITERATIONS, RS_ROUNDS = 5, 4


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
