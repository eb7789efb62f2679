"""The trainers on TextWorldExpress and ScienceWorld games (real engines, the tiny model): one PPO iteration in each
action mode and one rejection-sampling round, on a mixture whose two slots play one engine each, and a PPO run killed
and resumed that ends as the run never interrupted."""

import json

import pytest
from trainer_runs import assert_same_run, flags, run, run_killed_then_resumed

from lib.engines import engine_of
from lib.rollout import load_rollouts

MIXTURE = "twx-coin:numLocations=3:n=1,sciworld-find-living-thing:simplify=easy:n=1"
HELD_OUT = "twx-coin:numLocations=3:n=1"
RESUME_ITERATIONS = 3


@pytest.mark.parametrize("action_mode", ["score", "generate"])
def test_a_ppo_iteration_on_both_engines(action_mode, tiny_model_path, games_cache, tmp_path):
    output = tmp_path / "ppo"
    log = run("ppo_textworld.py", flags(
        model_name_or_path=tiny_model_path, train_games=MIXTURE, eval_games=HELD_OUT,
        output_dir=output, games_dir=games_cache, num_iterations=1, num_envs=2, turns_per_slot=2,
        num_minibatches=2, gradient_accumulation_steps=1, max_new_tokens=4, max_episode_turns=3,
        eval_episodes=1, max_candidates=3, trainable_layers_fraction=0.5, progress=False,
        report_to="none", action_mode=action_mode,
    ))
    assert "after training:" in log
    assert (output / "checkpoints" / "checkpoint-1" / "model.safetensors").exists()
    rows = load_rollouts(output)
    assert sorted(set(zip(rows["env"], rows["game"]))) == [
        ("sciworld", "sciworld:find-living-thing:0:easy"), ("twx", "twx:coin:train:0:numLocations=3"),
    ]
    assert all(0 <= score <= max_score == 1.0 for score, max_score in zip(rows["score"], rows["max_score"]))


def test_a_rejection_sampling_round_on_both_engines(tiny_model_path, games_cache, tmp_path):
    output = tmp_path / "rs"
    run("rejection_sampling.py", flags(
        model_name_or_path=tiny_model_path, train_games=MIXTURE, eval_games=HELD_OUT,
        output_dir=output, games_dir=games_cache, num_rounds=1, episodes_per_round=2, num_envs=2,
        max_episode_turns=3, eval_episodes=1, max_new_tokens=4, train_batch_size=2,
        learning_rate=1e-3, trainable_layers_fraction=0.5, progress=False, report_to="none",
    ))
    rows = load_rollouts(output, prefix="round")
    assert set(rows["env"]) == {"twx", "sciworld"}


def resume_args(model: str, games_dir, output) -> list[str]:
    """test_resume's PPO run (score mode) on the mixture: episodes of 4 turns cut by iterations of 3 turns a slot, so
    every checkpoint but the last leaves both engines mid-episode, and a resume replays their commands."""
    return flags(
        model_name_or_path=model, train_games=MIXTURE, eval_games=HELD_OUT, output_dir=output, games_dir=games_dir,
        num_iterations=RESUME_ITERATIONS, num_envs=2, turns_per_slot=3, num_minibatches=3,
        gradient_accumulation_steps=1, max_episode_turns=4, eval_episodes=1, eval_every=2, save_every=1,
        save_total_limit=0, max_candidates=3, length_normalize=True, temperature=4, trainable_layers_fraction=0.5,
        learning_rate=1e-3, progress=False,
    )


def test_ppo_on_both_engines_killed_and_resumed_equals_uninterrupted(tiny_model_path, games_cache, tmp_path):
    """The resumed run restarts each slot's JVM and replays the saved commands of its episode (BatchEnv's
    load_state_dict): it ends with the weights, trainer state, rollout rows and metrics of the uninterrupted run."""
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    run("ppo_textworld.py", resume_args(tiny_model_path, games_cache, uninterrupted))
    for iteration in range(1, RESUME_ITERATIONS - 1):  # the checkpoints run_killed_then_resumed may resume from
        checkpoint = uninterrupted / "checkpoints" / f"checkpoint-{iteration}"
        env = json.loads((checkpoint / "process_state-0.json").read_text())["rollout"]["env"]
        mid_episode = {engine_of(game) for (_, game), commands in zip(env["assigned"], env["commands"]) if commands}
        assert mid_episode == {"twx", "sciworld"}, f"checkpoint-{iteration} leaves nothing to replay in some engine"
    resumed_args = resume_args(tiny_model_path, games_cache, resumed)
    run_killed_then_resumed("ppo_textworld.py", resumed_args, RESUME_ITERATIONS, 0)
    assert_same_run(uninterrupted, resumed, "iteration", "iteration")
