import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lib.training
import ppo_textworld
from conftest import write_loadable_training_state
from lib.arguments import parse_arguments
from lib.losses import penalized_rewards, ppo_loss
from lib.models import load_model
from lib.rollout import load_rollouts
from lib.sequences import pack_sequences
from lib.value_head import PolicyWithValue, ValueHead, load_value_head

ROOT = Path(__file__).resolve().parents[1]


def test_penalized_rewards_put_the_turn_reward_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 9.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    rewards = penalized_rewards(kl, torch.tensor([1.0, -2.0, 5.0]), mask, kl_coef=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.9, 0.0], [-2.15, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_every_sample_of_a_minibatch_gets_gradient(tiny_model_path):
    """The original project used only the last sample of each minibatch: here every sample's loss term must reach
    its own logits and values, and the parameters move for each sample alone."""
    torch.manual_seed(0)
    policy = load_model(tiny_model_path)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size))
    prompts = [[10, 11, 12, 13], [14, 15], [16, 17, 18], [19]]
    responses = [[20, 21], [22], [23, 24, 25], [26, 27]]
    packed = pack_sequences(prompts, responses, pad_id=0)
    mask = packed["response_mask"]
    advantages = torch.randn(mask.shape)
    returns = torch.randn(mask.shape)

    def minibatch_loss(rows):
        logits, values = model(packed["input_ids"][rows], packed["attention_mask"][rows], packed["position_ids"][rows],
                               packed["start"], packed["end"])
        logits.retain_grad()
        values.retain_grad()
        with torch.no_grad():
            old_logprobs = torch.log_softmax(logits, -1).gather(-1, packed["response_ids"][rows, :, None])[..., 0]
        loss, _ = ppo_loss(logits, values, packed["response_ids"][rows], mask[rows], old_logprobs + 0.05,
                           values.detach() + 0.01, advantages[rows], returns[rows], clip_range=0.2, clip_range_value=0.2,
                           vf_coef=0.5, ent_coef=0.01)
        return loss, logits, values

    loss, logits, values = minibatch_loss(torch.arange(4))
    loss.backward()
    for row in range(4):
        valid = mask[row]
        assert logits.grad[row][valid].abs().sum() > 0, f"sample {row} gets no policy gradient"
        assert values.grad[row][valid].abs().sum() > 0, f"sample {row} gets no value gradient"
        assert logits.grad[row][~valid].abs().sum() == 0  # padding contributes nothing
    # Per-sample perturbation: dropping any one sample changes the parameter gradient.
    head_grad = model.value_head.net.weight.grad.clone()
    for row in range(4):
        model.zero_grad()
        minibatch_loss(torch.tensor([r for r in range(4) if r != row]))[0].backward()
        assert not torch.allclose(model.value_head.net.weight.grad, head_grad), f"sample {row} did not matter"


BAD_FLAGS = [
    (["--num_envs", "3", "--turns_per_slot", "1"], "--num_minibatches"),
    (["--gradient_accumulation_steps", "3"], "--gradient_accumulation_steps"),
    (["--clip_range", "0"], "--clip_range"),
    (["--clip_range_value=-0.1"], "--clip_range_value"),
    (["--learning_rate=-1e-5"], "--learning_rate"),
    (["--reward", "score,bonus"], "--reward"),
    (["--kl_estimator", "k4"], "--kl_estimator"),
    (["--kl_direction", "sideways"], "--kl_direction"),
    (["--value_head_type", "cnn"], "--value_head_type"),
    (["--trainable_layers_fraction", "0"], "--trainable_layers_fraction"),
    (["--temperature", "0"], "temperature"),
    (["--memory_turns", "-1"], "prompt flags"),
    (["--report_to", "comet"], "--report_to"),
    (["--train_games", "tw-nope:level=1"], "--train_games"),
    (["--eval_games", "/no/such/games"], "--eval_games"),
    (["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint"),
    (["--gamma_turn", "1.5"], "--gamma_turn"),
    (["--action_mode", "beam"], "--action_mode"),
    (["--action_mode", "score", "--max_candidates", "0"], "max_candidates"),
    (["--group_size", "2"], "--group_size"),  # groups are for grpo; gae plays every slot alone
    (["--advantage_estimator", "grpo"], "--group_size"),  # a group of one has nothing to compare with
    (["--advantage_estimator", "grpo", "--group_size", "2", "--num_envs", "4"], "--num_minibatches"),
    (["--advantage_estimator", "vtrace"], "--advantage_estimator"),
    (["--context", "session"], "--context"),
    (["--context", "episode", "--max_context_tokens", "300"], "--max_context_tokens"),
    (["--context", "episode", "--mark_tried"], "--mark_tried"),  # the episode's stream shows what was tried
    (["--action_mode", "generate", "--least_tried"], "--least_tried"),  # nothing to leave out of a written command
    (["--context", "episode", "--num_envs", "4"], "--num_minibatches"),  # 4 slots for 8 micro-batches of whole streams
    (["--advantage_estimator", "rloo"], "--group_size"),
    (["--advantage_estimator", "gigpo", "--group_size", "1"], "--group_size"),
    (["--advantage_estimator", "gigpo", "--group_size", "2", "--num_envs", "4"], "--num_minibatches"),
    (["--advantage_estimator", "rloo", "--group_size", "4", "--num_envs", "6"], "--group_size"),  # 6 slots, groups of 4
    (["--advantage_estimator", "gigpo", "--group_size", "2", "--gigpo_step_weight=-1"], "--gigpo_step_weight"),
    (["--value_learning_rate", "0"], "--value_learning_rate"),
    (["--value_warmup_iterations=-1"], "--value_warmup_iterations"),
    (["--advantage_estimator", "grpo", "--group_size", "2", "--value_learning_rate", "1e-4"], "--value_learning_rate"),
    (["--advantage_estimator", "gigpo", "--group_size", "2", "--value_warmup_iterations", "1"], "--value_warmup_iterations"),
    (["--curriculum_threshold", "1.5"], "--curriculum_threshold"),
    (["--curriculum_window", "0"], "--curriculum_window"),
    (["--train_max_episode_turns", "0"], "--train_max_episode_turns"),
    (["--train_games", "tiny > "], "--train_games"),
    (["--train_games", "tiny > tw-nope:level=1"], "--train_games"),
    (["--train_games", "tiny@0"], "--train_games"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[named + " " + " ".join(flags) for flags, named in BAD_FLAGS])
def test_bad_flags_fail_before_any_model_loads(flags, named, tmp_path, monkeypatch):
    monkeypatch.setattr(lib.training, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        ppo_textworld.main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message


def test_critic_free_estimators_accept_groups(tmp_path):
    """Each critic-free estimator passes the checks with groups of two (the same path as grpo's)."""
    from lib.arguments import parse_arguments

    for estimator in ppo_textworld.CRITIC_FREE_ESTIMATORS:
        argv = ["--advantage_estimator", estimator, "--group_size", "2", "--output_dir", str(tmp_path / estimator)]
        groups = parse_arguments(ppo_textworld.ALL_ARGUMENTS, argv)
        ppo_textworld.check_arguments(*groups, world_size=1)


def critic_free_turns(rows):
    """Transitions from (slot, episode, state key, reward) in rollout order: turn-major, the slots interleaved."""
    from lib.rollout import Transition

    return [Transition(slot=slot, game="g", episode=episode, turn=1, prompt="", response="", command="", prompt_ids=[1],
                       response_ids=[1, 2], logprobs=torch.zeros(2), ref_logprobs=torch.zeros(2), values=None,
                       reward=reward, score=0, max_score=1, done=False, truncated=False, won=False, invalid=False,
                       state_key=key)
            for slot, episode, key, reward in rows]


def test_gigpo_advantages_pool_the_turns_of_a_group_from_the_same_state():
    """The script's glue: episodes are (slot, episode) pairs, groups share the episode number, state keys pool only
    within a group, and every valid token of a turn gets the turn's advantage. Group 7 (slots 0, 1) reaches the
    same states "a", "b"; group 8 (slots 2, 3) has state "a" too, which must stay apart from group 7's."""
    rows = [(0, 7, "a", 0.0), (1, 7, "a", 0.0), (2, 8, "a", 1.0), (3, 8, "c", 0.0),  # first turns
            (0, 7, "b", 1.0), (1, 7, "a", 0.0), (2, 8, "d", 0.0),  # second turns (slot 3 ended)
            (1, 7, "b", 0.0)]  # slot 1's third turn
    turns = critic_free_turns(rows)
    rewards = torch.tensor([[0.0, reward] for *_, reward in rows])  # the turn's reward on its last token
    mask = torch.ones(len(rows), 2, dtype=torch.bool)
    mask[3, 1] = False  # a one-token response
    ppo = ppo_textworld.PPOArguments(advantage_estimator="gigpo", group_size=2, gamma_turn=0.5, gigpo_step_weight=0.3)
    advantages, returns = ppo_textworld.gigpo_advantages(turns, {"mask": mask}, rewards, ppo)
    # By hand, gamma 0.5: slot 0 earns 0, 1 (returns 0.5, 1); slot 1 earns 0, 0, 0; group 8: slot 2 earns 1, 0 and
    # slot 3 0. Episode level: group 7 returns 1 and 0, group 8 returns 1 and 0: +-1/sqrt(2) each.
    # Step level: group 7 "a" = {slot 0 turn 1: 0.5, slot 1 turns 1, 2: 0, 0}: mean 1/6, centered 1/3, -1/6, -1/6,
    # std sqrt((1/9 + 1/36 + 1/36) / 2) = 1/sqrt(12); "b" = {slot 0: 1, slot 1: 0}: +-1/sqrt(2); group 8: all alone.
    e, a, b = 1 / math.sqrt(2), 1 / math.sqrt(12), 1 / math.sqrt(2)
    expected = [e + 0.3 * (1 / 3) / a, -e - 0.3 * (1 / 6) / a, e, -e, e + 0.3 * b, -e - 0.3 * (1 / 6) / a, e,
                -e - 0.3 * b]
    assert advantages[:, 0].tolist() == pytest.approx(expected, rel=1e-4)
    assert torch.equal(advantages[:, 1], torch.where(mask[:, 1], advantages[:, 0], 0.0))
    assert returns[:, 0].tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0])


def test_rloo_and_grpo_advantages_compare_each_episode_with_its_group():
    rows = [(0, 7, "a", 1.0), (1, 7, "a", 0.0), (2, 8, "a", 3.0), (3, 8, "c", 0.0), (4, 8, "c", 0.0),
            (0, 7, "b", 1.0), (2, 8, "d", 0.0)]
    turns = critic_free_turns(rows)
    rewards = torch.tensor([[0.0, reward] for *_, reward in rows])
    mask = torch.ones(len(rows), 2, dtype=torch.bool)
    rloo = ppo_textworld.PPOArguments(advantage_estimator="rloo", group_size=2)
    advantages, returns = ppo_textworld.group_advantages(turns, {"mask": mask}, rewards, rloo)
    # Returns: group 7 = slot 0: 2, slot 1: 0; group 8 = slot 2: 3, slots 3, 4: 0. Leave one out: 2, -2; 3, -1.5, -1.5.
    assert advantages[:, 0].tolist() == pytest.approx([2.0, -2.0, 3.0, -1.5, -1.5, 2.0, 3.0])
    assert returns[:, 0].tolist() == pytest.approx([2.0, 0.0, 3.0, 0.0, 0.0, 2.0, 3.0])
    grpo = ppo_textworld.PPOArguments(advantage_estimator="grpo", group_size=2)
    advantages, _ = ppo_textworld.group_advantages(turns, {"mask": mask}, rewards, grpo)
    assert advantages[:, 0].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2), 2 / math.sqrt(3),
                                                       -1 / math.sqrt(3), -1 / math.sqrt(3), 1 / math.sqrt(2),
                                                       2 / math.sqrt(3)], rel=1e-4)


def test_config_file_is_read_and_a_missing_one_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nnum_envs: 3\nnum_steps: 1\n")
    with pytest.raises(SystemExit, match="--num_minibatches"):
        ppo_textworld.main([str(config)])
    with pytest.raises(SystemExit, match="config file not found: .*missing.yaml"):
        ppo_textworld.main([str(tmp_path / "missing.yaml")])


def test_an_earlier_run_is_not_overwritten_silently(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest.*--overwrite_output_dir"):
        ppo_textworld.main(["--output_dir", str(tmp_path), "--report_to", "none"])


def script_env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def test_bad_flag_exits_nonzero_with_one_error_line():
    result = subprocess.run(
        [sys.executable, "ppo_textworld.py", "--clip_range=-1"], cwd=ROOT, capture_output=True, text=True,
        env=script_env(), timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: --clip_range must be positive, got -1.0"


def run_script(args, launcher=(sys.executable,), timeout=400):
    result = subprocess.run(
        [*launcher, "ppo_textworld.py", *args], cwd=ROOT, capture_output=True, text=True, env=script_env(),
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def tiny_run_args(tiny_model_path, tiny_games, output_dir, **overrides):
    flags = {
        "model_name_or_path": tiny_model_path, "train_games": ",".join(tiny_games), "eval_games": ",".join(tiny_games),
        "output_dir": str(output_dir), "num_envs": 2, "turns_per_slot": 2, "num_minibatches": 2,
        "gradient_accumulation_steps": 1, "max_new_tokens": 4, "max_episode_turns": 3, "eval_episodes": 2,
        "trainable_layers_fraction": 0.5, "learning_rate": 1e-3, "progress": False, "report_to": "tensorboard",
        "action_mode": "generate", **overrides,
    }
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def test_end_to_end_train_checkpoint_and_resume(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=2, save_every=1, save_total_limit=0,
                                   value_warmup_iterations=1, value_learning_rate=3e-3))
    assert "random-admissible" in log and "before training" in log and "after training" in log
    # Iteration 1 trained the value head alone (all zeros at the start); iteration 2 the policy too (below).
    start = load_model(tiny_model_path).state_dict()
    warmed_up = load_model(str(output / "checkpoints" / "checkpoint-1")).state_dict()
    assert all(torch.equal(tensor, start[name]) for name, tensor in warmed_up.items())
    assert load_value_head(output / "checkpoints" / "checkpoint-1").net.weight.any()

    checkpoint = output / "checkpoints" / "checkpoint-2"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "value_head.safetensors", "README.md",
                 "training_args.json", "trainer_state.json", "training_state"):
        assert (checkpoint / name).exists(), name
        assert (output / name).exists() or name in ("trainer_state.json", "training_state"), name
    assert (output / "checkpoints" / "checkpoint-1").is_dir()
    assert "| after |" in (output / "README.md").read_text()

    # The checkpoint reloads to exactly the weights training resumes from, and holds no reference model.
    reloaded = load_model(str(checkpoint)).state_dict()
    saved = load_file(checkpoint / "model.safetensors")
    state = load_file(checkpoint / "training_state" / "model.safetensors")
    assert all(key.startswith(("policy.", "value_head.")) for key in state)
    assert not any("ref" in key for key in list(saved) + list(state))
    for name, tensor in reloaded.items():
        # The tied LM head is stored once, as the input embeddings.
        key = "policy.model.embed_tokens.weight" if name == "lm_head.weight" else f"policy.{name}"
        assert torch.equal(tensor, state[key]), name
    head = load_value_head(checkpoint)
    assert torch.equal(head.net.weight, state["value_head.net.weight"])
    # Only the trainable top moved: frozen layer 0 and the (tied) embeddings are the starting model's.
    assert torch.equal(reloaded["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(reloaded["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert not torch.equal(reloaded["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])
    root = load_file(output / "model.safetensors")
    assert all(torch.equal(root[key], saved[key]) for key in saved)

    dataset = load_rollouts(output)
    assert dataset.num_rows == 2 * 2 * 2  # num_envs * turns_per_slot * iterations
    # The warm-up left the policy on the reference: iteration 2 played with it (and the resumed run's iteration 3,
    # below, with the policy iteration 2 moved away from the reference, which stayed where it started).
    assert max(abs(kl) for kl, iteration in zip(dataset["kl"], dataset["iteration"]) if iteration == 2) < 1e-6
    assert list((output / "runs").rglob("events.out.tfevents*"))

    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=3, resume_from_checkpoint="latest",
                                   value_warmup_iterations=1, value_learning_rate=3e-3))
    assert "at iteration 2" in log
    assert json.loads((output / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["iteration"] == 3
    dataset = load_rollouts(output)
    assert dataset.num_rows == 2 * 2 * 3 and sorted(set(dataset["iteration"])) == [1, 2, 3]
    assert max(kl for kl, iteration in zip(dataset["kl"], dataset["iteration"]) if iteration == 3) > 1e-6


def test_a_curriculum_moves_on_when_its_stage_is_won_and_a_resume_stays_there(tiny_model_path, tiny_games,
                                                                              small_games, games_cache, tmp_path):
    """Stage 1 (the tiny games) until the win rate of its last 2 training episodes reaches 0 (at once), then stage 2
    (level-2 coin collectors) from iteration 2 on; a run resumed from there plays stage 2 in iteration 3."""
    output = tmp_path / "ppo"
    coin = "tw-coin_collector:level=2:n=2"
    flags = {"train_games": f"{','.join(tiny_games)} > {coin}", "curriculum_threshold": 0.0, "curriculum_window": 2,
             "max_episode_turns": 2, "report_to": "tensorboard", "action_mode": "score", "max_candidates": 3,
             "games_dir": games_cache, "eval_episodes": 0}
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=2, **flags))
    assert "curriculum: stage 2 of 2 from iteration 2" in log
    state = json.loads((output / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["curriculum"]["stage"] == 1 and len(state["curriculum"]["wins"]) == 2  # stage 2's record
    run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=3, resume_from_checkpoint="latest",
                             **flags))
    dataset = load_rollouts(output)
    games = {iteration: {game for game, i in zip(dataset["game"], dataset["iteration"]) if i == iteration}
             for iteration in (1, 2, 3)}
    assert games[1] <= set(tiny_games)
    assert games[2] and games[3] and games[2] | games[3] <= set(small_games[:2])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = sorted((output / "runs").rglob("events.out.tfevents*"))
    stages_logged = []
    for path in logged:
        events = EventAccumulator(str(path))
        events.Reload()
        if "charts/curriculum/stage" in events.Tags()["scalars"]:
            stages_logged += [(e.step, e.value) for e in events.Scalars("charts/curriculum/stage")]
    assert sorted(stages_logged) == [(1, 1.0), (2, 2.0), (3, 2.0)]


def test_two_process_deepspeed_zero2_on_cpu(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero2.yaml")
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=1, report_to="none",
                                   value_warmup_iterations=1, value_learning_rate=3e-3), launcher, timeout=600)
    assert "after training" in log
    dataset = load_rollouts(output)
    assert dataset.num_rows == 2 * 2 and sorted(set(dataset["process"])) == [0, 1]
    assert sorted(set(dataset["game"])) == sorted(tiny_games)  # each process played its own game
    assert (output / "checkpoints" / "checkpoint-1" / "model.safetensors").exists()
    # ZeRO-2 kept the optimizer's parameter groups and their rates: the warm-up moved the value head alone.
    head = load_value_head(output)
    assert head.config()["head_type"] == "linear" and head.net.weight.any()
    start = load_model(tiny_model_path).state_dict()
    assert all(torch.equal(tensor, start[name]) for name, tensor in load_model(str(output)).state_dict().items())


def check_score_mode_rollouts(output, rows):
    dataset = load_rollouts(output)
    assert dataset.num_rows == rows
    for row in dataset:
        assert 1 <= len(row["candidates"]) <= 3 and row["command"] == row["candidates"][row["chosen_index"]]
        assert row["response"] == row["command"] and not row["invalid"]
    return dataset


def test_end_to_end_score_mode(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    # The tiny random model puts almost all mass on its shortest candidate: mean scores at a high temperature spread
    # the samples, so that some win and the update has advantages to follow.
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=2, action_mode="score",
                                   max_candidates=3, length_normalize=True, temperature=4, kl_loss_coef=0.1,
                                   ent_coef=0.01, report_to="none"))
    assert "before training: normalized score" in log and "after training" in log
    dataset = check_score_mode_rollouts(output, 2 * 2 * 2)
    # The update moved the policy's candidate distribution away from the reference's.
    assert max(kl for kl, iteration in zip(dataset["kl"], dataset["iteration"]) if iteration == 2) > 1e-6
    assert json.loads((output / "training_args.json").read_text())["action_mode"] == "score"


@pytest.mark.parametrize("context", ["window", "episode"])
def test_the_shared_trunk_trains_the_same_policy(context, tiny_model_path, tiny_games, tmp_path):
    """Score mode with the reference on the policy's trunk and the update from the kept trunk states (the default)
    plays the same turns and ends with the same weights as two whole models (--share_trunk false)."""
    outputs = {}
    for shared in (True, False):
        outputs[shared] = tmp_path / f"shared-{shared}"
        run_script(tiny_run_args(tiny_model_path, tiny_games, outputs[shared], num_iterations=2, action_mode="score",
                                 max_candidates=3, length_normalize=True, temperature=4, kl_loss_coef=0.1,
                                 eval_episodes=0, report_to="none", context=context, max_context_tokens=600,
                                 share_trunk=shared))
    rollouts = [load_rollouts(outputs[shared]) for shared in (True, False)]
    assert rollouts[0]["command"] == rollouts[1]["command"]
    for column in ("logprob", "kl", "value", "advantage"):
        torch.testing.assert_close(torch.tensor(rollouts[0][column]), torch.tensor(rollouts[1][column]), atol=1e-4,
                                   rtol=1e-4)
    weights = [load_model(str(outputs[shared])).state_dict() for shared in (True, False)]
    start = load_model(tiny_model_path).state_dict()
    assert any(not torch.equal(tensor, start[name]) for name, tensor in weights[0].items())  # it trained
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-4, rtol=1e-4)


def test_two_process_deepspeed_zero2_on_cpu_score_mode(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero2.yaml")
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=1, report_to="none",
                                   action_mode="score", max_candidates=3), launcher, timeout=600)
    assert "after training" in log
    assert sorted(set(check_score_mode_rollouts(output, 2 * 2)["process"])) == [0, 1]


@pytest.mark.parametrize("mode,flags", [("generate", {}), ("score", {}),
                                        ("score", {"advantage_estimator": "gigpo", "group_size": 2, "num_envs": 4})],
                         ids=["generate", "score", "score-gigpo"])
def test_end_to_end_episode_context(mode, flags, tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=2, action_mode=mode,
                                   max_candidates=3, context="episode", max_context_tokens=600, report_to="none",
                                   **flags))
    assert "after training" in log
    dataset = load_rollouts(output)
    if not flags:  # gae: num_envs * turns_per_slot * iterations; critic-free estimators play whole episodes
        assert dataset.num_rows == 2 * 2 * 2
    for stream in set(zip(dataset["iteration"], dataset["stream"])):  # a stream is its turns' tokens, in order
        rows = [row for row in dataset if (row["iteration"], row["stream"]) == stream]
        offsets = [row["stream_offset"] for row in rows]
        assert offsets == [sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in rows[:k]) for k in range(len(rows))]
    assert json.loads((output / "training_args.json").read_text())["context"] == "episode"


def test_two_process_deepspeed_zero2_on_cpu_episode_context(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero2.yaml")
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=1, report_to="none",
                                   action_mode="score", max_candidates=3, context="episode", max_context_tokens=600,
                                   num_minibatches=1), launcher, timeout=600)
    assert "after training" in log
    assert sorted(set(check_score_mode_rollouts(output, 2 * 2)["process"])) == [0, 1]


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    stages = {"single_gpu": None, "multi_gpu": None, "zero2": 2, "zero3": 3, "zero3_offload": 3, "cpu_zero2": 2}
    for name, stage in stages.items():
        config = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
        assert (config.deepspeed_config or {}).get("zero_stage") == stage, name
        assert not config.use_cpu, name  # with use_cpu, two gloo processes do not start on a CPU machine


def test_a_custom_reward_fn_is_what_the_turns_earn(tiny_model_path, tiny_games, tmp_path, monkeypatch):
    """REWARD_FN replaces the reward chain, and it sees the episode's history: here 0.1 per earlier turn of the
    episode, +1 for a command already given in it."""

    def reward(outcome):
        repeated = any(turn.command == outcome.command for turn in outcome.history)
        return 0.1 * len(outcome.history) + float(repeated)

    monkeypatch.setattr(ppo_textworld, "REWARD_FN", reward)
    output = tmp_path / "ppo"
    ppo_textworld.main(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=1, action_mode="score",
                                     max_candidates=3, eval_episodes=0, report_to="none", max_episode_turns=4,
                                     turns_per_slot=4))
    rows = sorted(load_rollouts(output).to_list(), key=lambda row: (row["slot"], row["episode"], row["turn"]))
    earlier: dict[tuple, list[str]] = {}
    for row in rows:
        commands = earlier.setdefault((row["slot"], row["episode"]), [])
        assert row["turn"] == len(commands) + 1
        assert row["reward"] == pytest.approx(0.1 * len(commands) + float(row["command"] in commands))
        commands.append(row["command"])
    assert any(row["turn"] > 1 for row in rows)


def test_grpo_plays_groups_of_whole_episodes_and_builds_no_value_head(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    log = run_script(tiny_run_args(tiny_model_path, tiny_games, output, num_iterations=2, action_mode="score",
                                   max_candidates=3, report_to="none", advantage_estimator="grpo", group_size=2,
                                   num_minibatches=1, temperature=4, clip_range_value="none", max_episode_turns=6,
                                   train_max_episode_turns=2))
    assert "after training" in log
    for folder in (output, output / "checkpoints" / "checkpoint-2"):
        assert not (folder / "value_head.safetensors").exists()
    state = load_file(output / "checkpoints" / "checkpoint-2" / "training_state" / "model.safetensors")
    assert state and not any(key.startswith("value_head.") for key in state)
    rows = load_rollouts(output).to_list()
    # Training episodes end by --train_max_episode_turns 2; the greedy evaluations play up to --max_episode_turns 6
    # (the untrained tiny policy wins none, so it plays all 6).
    assert max(row["turn"] for row in rows) == 2
    assert all(row["truncated"] for row in rows if row["turn"] == 2 and not row["done"])
    evals = json.loads((output / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())["evals"]
    assert evals["before"]["mean_steps"] > 2
    for iteration in (1, 2):
        episodes: dict[tuple, list[dict]] = {}
        for row in rows:
            if row["iteration"] == iteration:
                episodes.setdefault((row["slot"], row["episode"]), []).append(row)
        # Whole episodes: each slot played exactly one, from its first turn to its end; the two slots of the group
        # played the same game (same episode number), and their advantages are opposite or both 0.
        assert sorted(slot for slot, _ in episodes) == [0, 1] and len({episode for _, episode in episodes}) == 1
        for turns in episodes.values():
            assert [row["turn"] for row in turns] == list(range(1, len(turns) + 1))
            assert turns[-1]["done"] or turns[-1]["truncated"]
            assert len({row["advantage"] for row in turns}) == 1
        first, second = (turns[0]["advantage"] for turns in episodes.values())
        assert first == pytest.approx(-second, abs=1e-5)
        assert len({row["game"] for turns in episodes.values() for row in turns}) == 1


def test_clip_range_value_takes_none_on_the_command_line_and_in_yaml(tmp_path):
    def parsed(argv):
        return parse_arguments(ppo_textworld.ALL_ARGUMENTS, argv)[1].clip_range_value

    assert parsed([]) == 0.2 and parsed(["--clip_range_value", "0.3"]) == 0.3
    assert parsed(["--clip_range_value", "none"]) is None and parsed(["--clip_range_value", "None"]) is None
    assert parsed(["--clip_range_value=none"]) is None
    config = tmp_path / "run.yaml"
    config.write_text("clip_range_value: null\nnum_envs: null\n")  # null keeps the default where None is no value
    assert parsed([str(config)]) is None and parse_arguments(ppo_textworld.ALL_ARGUMENTS, [str(config)])[0].num_envs == 8
    assert parsed([str(config), "--clip_range_value", "0.5"]) == 0.5


def test_deprecated_flag_names_still_work_with_a_warning(capsys):
    run = parse_arguments(ppo_textworld.ALL_ARGUMENTS, ["--num_steps", "3", "--max_episode_steps=7"])[0]
    assert (run.turns_per_slot, run.max_episode_turns) == (3, 7)
    warnings = capsys.readouterr().err
    assert "--num_steps is deprecated" in warnings and "use --turns_per_slot" in warnings
    assert "--max_episode_steps is deprecated" in warnings


def test_a_ppo_output_continues_with_its_value_head(tiny_model_path, tmp_path):
    """--model_name_or_path a PPO output: its saved value head is the one training goes on with (the model card says
    so); a head of another type is refused; a folder without one gets a new head, all zeros."""
    import shutil

    from lib.value_head import save_value_head

    folder = tmp_path / "ppo_output"
    shutil.copytree(tiny_model_path, folder)
    policy = load_model(str(folder))
    saved = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(saved.net.weight)
    save_value_head(saved, folder)
    args = ppo_textworld.ValueHeadArguments(detach_value_head=True)
    head = ppo_textworld.build_value_head(policy, str(folder), args)
    assert torch.equal(head.net.weight, saved.net.weight) and head.detach_input
    with pytest.raises(SystemExit, match="error: .*linear value head.*--value_head_type"):
        ppo_textworld.build_value_head(policy, str(folder), ppo_textworld.ValueHeadArguments(value_head_type="mlp"))
    fresh = ppo_textworld.build_value_head(policy, tiny_model_path, args)
    assert not fresh.net.weight.any()


def test_a_checkpoint_from_before_the_flag_renames_resumes_only_with_its_values(tmp_path):
    """Its training_args.json says max_episode_steps and has no advantage_estimator or train_max_episode_turns: they
    count as --max_episode_turns, gae and no training cap when the resume guard compares flags."""
    from lib.training import find_resume_checkpoint

    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    write_loadable_training_state(checkpoint / "training_state")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"iteration": 2}))
    (checkpoint / "config.json").write_text("{}")  # a complete checkpoint holds its model
    (checkpoint / "training_args.json").write_text(json.dumps({"max_episode_steps": 12, "seed": 0}))
    arguments = {"max_episode_turns": 12, "seed": 0, "advantage_estimator": "gae", "group_size": 1,
                 "train_max_episode_turns": None}
    assert find_resume_checkpoint("latest", str(tmp_path), "iteration", 6, "--num_iterations", arguments, 1) == checkpoint
    for changed, named in (({"max_episode_turns": 30}, "--max_episode_turns 12"),
                           ({"advantage_estimator": "grpo"}, "--advantage_estimator gae"),
                           ({"train_max_episode_turns": 6}, "--train_max_episode_turns None")):
        with pytest.raises(ValueError, match=named):
            find_resume_checkpoint("latest", str(tmp_path), "iteration", 6, "--num_iterations", {**arguments, **changed}, 1)
