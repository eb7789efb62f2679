import copy

import pytest
import torch

from lib.env import GameState, StepResult, state_key
from lib.generation import GenerationConfig
from lib.losses import gae_advantages, kl_estimate, penalized_rewards, turn_gae
from lib.models import load_model, load_tokenizer
from lib.prompts import PromptConfig, Turn, build_prompt, clean_observation
from lib.rewards import RewardConfig, reward_chain
from lib.rollout import RolloutCollector, ScoringRolloutCollector, load_rollouts, rollout_rows, save_rollouts
from lib.scoring import ScoringConfig, candidate_logprobs_naive, encode_candidates, policy_logprobs
from lib.sequences import pack_sequences
from lib.value_head import PolicyWithValue, ValueHead
from ppo_textworld import PPOArguments, collate_decisions, collate_responses, turn_level_gae

OBJECTIVE = "Find the coin."


class ScriptedEnv:
    """Two slots with fixed episode lengths: slot 0 wins at its 3rd step, slot 1 is truncated at its 2nd."""

    num_envs = 2
    plan = [(3, "won"), (2, "truncated")]

    def reset(self):
        self.episodes, self.steps = [0, 0], [0, 0]
        self.states = [self.state(slot) for slot in range(2)]
        return list(self.states)

    def state(self, slot, won=False):
        return GameState(
            game=f"game-{slot}", episode=self.episodes[slot], steps=self.steps[slot],
            observation=observation(slot, self.episodes[slot], self.steps[slot]), score=int(won), max_score=1,
            moves=self.steps[slot], won=won, lost=False, admissible_commands=["take coin", "go east"],
            objective=OBJECTIVE, inventory="", walkthrough=None,
        )

    def step(self, commands):
        results = []
        for slot, command in enumerate(commands):
            self.steps[slot] += 1
            length, ending = self.plan[slot]
            done = self.steps[slot] >= length
            after = self.state(slot, won=done and ending == "won")
            result = StepResult(command, float(after.won), done and ending == "won", done and ending == "truncated",
                                after, after, invalid=command not in ("take coin", "go east"))
            if done:
                self.episodes[slot], self.steps[slot] = self.episodes[slot] + 1, 0
                result.next_state = self.state(slot)
            self.states[slot] = result.next_state
            results.append(result)
        return results


def observation(slot, episode, step):
    return f"Room {slot}-{episode}-{step}. There is a coin here. Exits: east."


@pytest.fixture(scope="module")
def models(tiny_model_path):
    torch.manual_seed(0)
    policy = load_model(tiny_model_path)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for param in ref.parameters():
            param.add_(0.05 * torch.randn_like(param))  # a reference that differs from the policy
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.net.weight, std=0.5)
    return PolicyWithValue(policy, head).eval(), ref.eval(), load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def collected(models):
    model, ref, tokenizer = models
    torch.manual_seed(1)
    collector = RolloutCollector(
        ScriptedEnv(), tokenizer, PromptConfig(memory_turns=2), GenerationConfig(max_new_tokens=4),
        reward_chain(RewardConfig(("score", "invalid"))),
    )
    first = collector.collect(model, ref, turns_per_slot=4)
    second = collector.collect(model, ref, turns_per_slot=1)
    return first, second


def state_value(model, tokenizer, prompt: str) -> float:
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        _, values = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], ids.shape[1] - 1, ids.shape[1])
    return float(values[0, 0])


def test_pack_sequences_layout():
    packed = pack_sequences([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert packed["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert packed["position_ids"][:, :4].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert packed["position_ids"][1, 4] == 2
    assert (packed["start"], packed["end"]) == (2, 4)  # position 2 predicts response token 0 of both rows
    assert packed["response_ids"].tolist() == [[5, 0], [6, 7]]
    assert packed["response_mask"].tolist() == [[True, False], [True, True]]


def test_next_value_bootstrap_indexing(collected, models):
    model, _, tokenizer = models
    first, second = collected
    turns = first.transitions
    assert len(turns) == 8 and [t.slot for t in turns] == [0, 1] * 4
    by_step = {(t.slot, i // 2): t for i, t in enumerate(turns)}
    # Slot 0 wins at its 3rd step (step index 2): 0 after termination, else the same slot's next turn's values[0].
    assert by_step[0, 2].done and by_step[0, 2].next_value == 0.0
    for step in (0, 1):
        assert by_step[0, step].next_value == pytest.approx(float(by_step[0, step + 1].values[0]), abs=1e-6)
    # The last turn of the rollout bootstraps from the state the next rollout starts from.
    assert by_step[0, 3].next_value == pytest.approx(float(second.transitions[0].values[0]), abs=1e-4)
    # Slot 1 is truncated at steps 1 and 3 (the last): the value of the episode's FINAL state, never the next
    # episode's first state; the prompt holds the episode's history including the truncated turn.
    assert by_step[1, 0].next_value == pytest.approx(float(by_step[1, 1].values[0]), abs=1e-6)
    config = PromptConfig(memory_turns=2)
    for step in (1, 3):
        turn = by_step[1, step]
        assert turn.truncated and not turn.done
        episode_turns = [by_step[1, step - 1], turn]
        history = [
            Turn(clean_observation(observation(1, t.episode, t.turn - 1), OBJECTIVE), t.command) for t in episode_turns
        ]
        final = build_prompt(OBJECTIVE, clean_observation(observation(1, turn.episode, 2), OBJECTIVE), "",
                             ["take coin", "go east"], history, config, tokenizer)
        assert turn.next_value == pytest.approx(state_value(model, tokenizer, final), abs=1e-4)
        assert turn.next_value != pytest.approx(float(by_step[1, step + 1].values[0]) if step == 1 else
                                                float(second.transitions[1].values[0]), abs=1e-6)
    # Histories persist across collect calls and restart with each episode.
    assert second.transitions[0].episode == 1 and second.transitions[0].turn == 2
    assert "Room 0-1-0" in second.transitions[0].prompt


def test_cached_logprobs_values_and_ref_logprobs_equal_a_fresh_unpadded_forward(collected, models):
    model, ref, _ = models
    for turn in collected[0].transitions + collected[1].transitions:
        ids = torch.tensor([turn.prompt_ids + turn.response_ids])
        start, end = len(turn.prompt_ids) - 1, ids.shape[1] - 1
        with torch.no_grad():
            logits, values = model(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], start, end)
            ref_logits = ref(ids).logits[:, start:end]
        labels = torch.tensor(turn.response_ids)
        fresh = torch.log_softmax(logits[0], -1)[torch.arange(len(labels)), labels]
        fresh_ref = torch.log_softmax(ref_logits[0], -1)[torch.arange(len(labels)), labels]
        assert torch.allclose(turn.logprobs, fresh, atol=1e-4)
        assert torch.allclose(turn.ref_logprobs, fresh_ref, atol=1e-4)
        assert torch.allclose(turn.values, values[0], atol=1e-4)
        assert not torch.allclose(turn.logprobs, turn.ref_logprobs, atol=1e-4)


def test_rewards_and_episode_summaries(collected):
    first, _ = collected
    won = [t for t in first.transitions if t.done]
    assert won and all(t.reward == pytest.approx(1.0 - 0.1 * t.invalid) for t in won)
    assert [(e["game"], e["won"], e["length"]) for e in first.episodes] == [
        ("game-1", False, 2), ("game-0", True, 3), ("game-1", False, 2)
    ]
    # Each turn names the state it was played from (GiGPO's step groups), not the one it led to.
    for t in first.transitions:
        before = GameState(game=t.game, episode=t.episode, observation=observation(t.slot, t.episode, t.turn - 1),
                           score=0, max_score=1, moves=t.turn - 1, won=False, lost=False,
                           admissible_commands=["take coin", "go east"], objective=OBJECTIVE, inventory="",
                           walkthrough=None)
        assert t.state_key == state_key(before)


def test_rollout_dataset_rows_columns_and_atomic_iterations(collected, tmp_path):
    for iteration, rollout in enumerate(collected, start=1):
        batch = collate_responses(rollout.transitions, pad_id=0)
        kl = kl_estimate(batch["logprobs"], batch["ref_logprobs"], estimator="k3") * batch["mask"]
        advantages, returns = gae_advantages(
            batch["rewards"][:, None] * batch["mask"], batch["values"], batch["mask"], batch["next_values"],
            batch["dones"], gamma_token=1.0, gamma_turn=0.9, lam=0.95,
        )
        rows = rollout_rows(rollout.transitions, iteration, 0, advantages, returns, kl, batch["mask"])
        save_rollouts(rows, tmp_path, iteration)
    save_rollouts(rows, tmp_path, 2)  # a rerun of an iteration replaces it instead of failing or duplicating
    dataset = load_rollouts(tmp_path)
    assert dataset.num_rows == 8 + 2
    assert {"iteration", "process", "game", "episode", "turn", "prompt", "response", "reward", "score", "done", "advantage",
            "return", "value", "logprob", "kl"} <= set(dataset.column_names)
    assert dataset["iteration"] == [1] * 8 + [2] * 2
    first = collected[0].transitions[0]
    assert dataset[0]["logprob"] == pytest.approx(float(first.logprobs.sum()), abs=1e-5)
    assert dataset[0]["value"] == pytest.approx(float(first.values[0]), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == ["iteration-00001", "iteration-00002"]
    with pytest.raises(FileNotFoundError, match="no rollouts"):
        load_rollouts(tmp_path / "empty")


def test_collate_pads_right_and_keeps_turn_fields(collected):
    turns = collected[0].transitions
    batch = collate_responses(turns, pad_id=0)
    lengths = [len(t.response_ids) for t in turns]
    assert batch["mask"].sum(dim=1).tolist() == lengths
    assert batch["dones"].tolist() == [float(t.done) for t in turns]
    assert torch.equal(batch["next_values"], torch.tensor([t.next_value for t in turns]))
    assert not torch.isnan(batch["next_values"]).any()


# ---------------------------------------------------------------- score mode


@pytest.fixture(scope="module")
def scored_rollouts(models):
    model, ref, tokenizer = models
    torch.manual_seed(2)
    collector = ScoringRolloutCollector(
        ScriptedEnv(), tokenizer, PromptConfig(memory_turns=2), ScoringConfig(temperature=2.0),
        reward_chain(RewardConfig(("score", "invalid"))),
    )
    return collector.collect(model, ref, turns_per_slot=4), collector.collect(model, ref, turns_per_slot=1)


def test_score_mode_caches_candidate_logprobs_values_and_bootstraps(scored_rollouts, models):
    model, ref, tokenizer = models
    first, second = scored_rollouts
    turns = first.transitions
    assert len(turns) == 8 and [t.slot for t in turns] == [0, 1] * 4
    config = PromptConfig(memory_turns=2)
    for turn in turns:
        assert turn.candidates == ["take coin", "go east"] and turn.command == turn.candidates[turn.chosen_index]
        assert not turn.invalid
        # Behaviour and reference: softmax(scores / 2) over the candidates, scored from scratch here.
        candidate_ids = encode_candidates([turn.candidates], config, tokenizer)
        assert turn.candidate_ids == candidate_ids[0] and turn.response_ids == candidate_ids[0][turn.chosen_index]
        with torch.no_grad():
            for lm, cached in ((model.policy, turn.logprobs), (ref, turn.ref_logprobs)):
                scores = candidate_logprobs_naive(lm, [turn.prompt_ids], candidate_ids, tokenizer.pad_token_id)[0]
                expected = policy_logprobs(scores, 2.0)[turn.chosen_index : turn.chosen_index + 1]
                torch.testing.assert_close(cached, expected, atol=1e-4, rtol=1e-4)
        assert float(turn.values[0]) == pytest.approx(state_value(model, tokenizer, turn.prompt), abs=1e-4)
    by_step = {(t.slot, i // 2): t for i, t in enumerate(turns)}
    # The same bootstraps as generate mode: 0 after a win, the next turn's value, the final state's value.
    assert by_step[0, 2].done and by_step[0, 2].next_value == 0.0
    assert by_step[0, 0].next_value == pytest.approx(float(by_step[0, 1].values[0]), abs=1e-6)
    assert by_step[0, 3].next_value == pytest.approx(float(second.transitions[0].values[0]), abs=1e-4)
    truncated = by_step[1, 1]
    assert truncated.truncated and truncated.next_value != pytest.approx(float(by_step[1, 2].values[0]), abs=1e-6)
    history = [Turn(clean_observation(observation(1, 0, step), OBJECTIVE), by_step[1, step].command) for step in (0, 1)]
    final = build_prompt(OBJECTIVE, clean_observation(observation(1, 0, 2), OBJECTIVE), "", ["take coin", "go east"],
                         history, config, tokenizer)
    assert truncated.next_value == pytest.approx(state_value(model, tokenizer, final), abs=1e-4)


class OneRoomEnv(ScriptedEnv):
    """ScriptedEnv whose slots never leave their room: every turn of an episode sees the same observation, with three
    admissible commands; slot 0 wins at its 7th step, slot 1 is truncated at its 4th."""

    plan = [(7, "won"), (4, "truncated")]
    commands = ["take coin", "go east", "open chest"]

    def state(self, slot, won=False):
        state = super().state(slot, won)
        state.observation, state.admissible_commands = f"Room {slot}. A coin and a chest.", list(self.commands)
        return state


def test_score_mode_with_least_tried_samples_among_the_commands_least_played_there(models):
    model, ref, tokenizer = models
    torch.manual_seed(3)
    collector = ScoringRolloutCollector(
        OneRoomEnv(), tokenizer, PromptConfig(), ScoringConfig(temperature=2.0, least_tried=True),
        reward_chain(RewardConfig(("score",))),
    )
    turns = collector.collect(model, ref, turns_per_slot=8).transitions
    for slot in (0, 1):
        played = []  # the commands of the slot's current episode
        for turn in [t for t in turns if t.slot == slot]:
            fewest = min(played.count(c) for c in OneRoomEnv.commands)
            assert turn.candidates == [c for c in OneRoomEnv.commands if played.count(c) == fewest]
            played = [] if turn.done or turn.truncated else played + [turn.command]
    assert any(len(t.candidates) == 1 for t in turns) and any(t.done for t in turns)


def test_score_mode_turn_advantages_and_rows(scored_rollouts, tmp_path):
    turns = scored_rollouts[0].transitions
    batch = collate_decisions(turns)
    assert batch["mask"].shape == batch["logprobs"].shape == batch["values"].shape == (8, 1)
    assert batch["chosen_index"].tolist() == [t.chosen_index for t in turns]
    kl = kl_estimate(batch["logprobs"], batch["ref_logprobs"], estimator="k3") * batch["mask"]
    rewards = penalized_rewards(kl, batch["rewards"], batch["mask"], kl_coef=0.1)
    advantages, returns = turn_level_gae(turns, batch, rewards, PPOArguments(gamma_turn=0.9, lam=0.8))
    rewards = rewards[:, 0]
    # Each slot's turns in time order, through turn_gae one slot at a time.
    for slot in (0, 1):
        rows = [i for i, t in enumerate(turns) if t.slot == slot]
        expected, expected_returns = turn_gae(
            rewards[rows][None], batch["values"][rows, 0][None], torch.ones(1, 4), batch["next_values"][rows][None],
            batch["dones"][rows][None], batch["truncateds"][rows][None], gamma=0.9, lam=0.8,
        )
        torch.testing.assert_close(advantages[rows, 0], expected[0])
        torch.testing.assert_close(returns[rows, 0], expected_returns[0])
    save_rollouts(rollout_rows(turns, 1, 0, advantages, returns, kl, batch["mask"]), tmp_path, 1)
    dataset = load_rollouts(tmp_path)
    assert dataset["candidates"] == [t.candidates for t in turns]
    assert dataset["chosen_index"] == [t.chosen_index for t in turns]
    assert dataset["logprob"] == pytest.approx([float(t.logprobs[0]) for t in turns], abs=1e-6)


def test_rollouts_written_before_the_column_renames_load_with_todays_names(tmp_path):
    """An output folder resumed across the rename holds iterations with `step` / `rank` (PPO's process index) and
    iterations with `turn` / `process`: they load as one dataset under today's names; rejection sampling's `rank`
    (the selection's) stays."""
    from datasets import Dataset

    Dataset.from_list([{"iteration": 1, "rank": 0, "step": 1}]).save_to_disk(str(tmp_path / "rollouts" / "iteration-00001"))
    save_rollouts([{"iteration": 2, "process": 1, "turn": 2}], tmp_path, 2)
    dataset = load_rollouts(tmp_path)
    assert dataset.to_list() == [{"iteration": 1, "process": 0, "turn": 1}, {"iteration": 2, "process": 1, "turn": 2}]
    Dataset.from_list([{"round": 1, "rank": 3, "step": 1}]).save_to_disk(str(tmp_path / "rollouts" / "round-00001"))
    assert load_rollouts(tmp_path, prefix="round").to_list() == [{"round": 1, "rank": 3, "turn": 1}]


def test_rollouts_from_before_the_other_engines_load_beside_todays(tmp_path):
    """Iterations written before TextWorldExpress and ScienceWorld (integer scores, no env column) and today's
    (float scores, env) load as one dataset."""
    from datasets import Dataset

    Dataset.from_list([{"iteration": 1, "game": "games/a.z8", "score": 1, "max_score": 2}]).save_to_disk(
        str(tmp_path / "rollouts" / "iteration-00001"))
    save_rollouts([{"iteration": 2, "game": "twx:coin:train:0", "env": "twx", "score": 0.5, "max_score": 1.0}],
                  tmp_path, 2)
    assert load_rollouts(tmp_path).to_list() == [
        {"iteration": 1, "game": "games/a.z8", "score": 1.0, "max_score": 2.0, "env": "textworld"},
        {"iteration": 2, "game": "twx:coin:train:0", "env": "twx", "score": 0.5, "max_score": 1.0},
    ]
