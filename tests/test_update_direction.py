"""One update of ppo_textworld.py's own code moves the policy the right way: on a scripted batch of two turns, the
action that earned a positive reward becomes likelier and the one that earned a negative reward less likely, in
both action modes, with and without whitening, through the script's advantages (advantages_and_returns) and its
update (ppo_update with its loss_fn)."""

import math
from functools import partial

import pytest
import torch
from accelerate import Accelerator

import ppo_textworld
from lib.models import load_model, load_tokenizer
from lib.rollout import Transition
from lib.scoring import encode_candidates, score_candidates
from lib.prompts import PromptConfig
from lib.sequences import score_sequences
from lib.training import NonFiniteGuard, build_optimizer
from lib.value_head import PolicyWithValue, ValueHead

PROMPTS = ["You are in a kitchen. A door leads north.", "You see a chest and a key on the floor of the cellar."]
REWARDS = [1.0, -1.0]  # the first turn's action was good, the second's bad
# Score mode: each state's candidates and the index of the one taken.
CANDIDATES = [["go north", "open fridge", "take apple"], ["take key", "open chest", "go up"]]
CHOSEN = [0, 1]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def fresh_model(tiny_model_path, with_value_head=True):
    torch.manual_seed(0)
    policy = load_model(tiny_model_path)
    head = ValueHead(policy.config.hidden_size) if with_value_head else None
    return PolicyWithValue(policy, head), load_model(tiny_model_path).eval()


def turn(slot, prompt_ids, response_ids, scored, row, reward, **score_mode):
    """A terminated one-turn episode: its advantage is its reward (value head at 0, next value 0)."""
    values = None if scored["values"] is None else scored["values"][row, : max(1, len(response_ids))]
    return Transition(
        slot=slot, game="g", episode=slot, turn=1, prompt="", response="", command="", prompt_ids=prompt_ids,
        response_ids=response_ids, logprobs=scored["logprobs"][row, : len(response_ids)],
        ref_logprobs=scored["ref_logprobs"][row, : len(response_ids)], values=values, reward=reward, score=0,
        max_score=1, done=True, truncated=False, won=reward > 0, invalid=False, state_key="start", next_value=0.0,
        **score_mode,
    )


def generate_mode_turns(model, ref, tokenizer):
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    response_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ("go north", "open chest")]
    scored = score_sequences(model, ref, prompt_ids, response_ids, tokenizer.pad_token_id)
    return [turn(i, prompt_ids[i], response_ids[i], scored, i, REWARDS[i]) for i in range(2)]


def score_mode_turns(model, ref, tokenizer):
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    candidate_ids = encode_candidates(CANDIDATES, PromptConfig(), tokenizer)
    with torch.no_grad():
        scored = score_candidates(model, ref, prompt_ids, candidate_ids, tokenizer.pad_token_id, False, 1.0)
    turns = []
    for i in range(2):
        chosen = {key: None if value is None else value[i : i + 1, CHOSEN[i] : CHOSEN[i] + 1][0]
                  for key, value in scored.items() if key in ("logprobs", "ref_logprobs")}
        values = None if scored["values"] is None else scored["values"][i : i + 1]
        turns.append(Transition(
            slot=i, game="g", episode=i, turn=1, prompt="", response="", command=CANDIDATES[i][CHOSEN[i]],
            prompt_ids=prompt_ids[i], response_ids=candidate_ids[i][CHOSEN[i]], logprobs=chosen["logprobs"],
            ref_logprobs=chosen["ref_logprobs"], values=values, reward=REWARDS[i], score=0, max_score=1, done=True,
            truncated=False, won=REWARDS[i] > 0, invalid=False, state_key="start", next_value=0.0, candidates=CANDIDATES[i],
            chosen_index=CHOSEN[i], candidate_ids=candidate_ids[i],
        ))
    return turns


def chosen_logprobs(model, turns, tokenizer, score_mode):
    """The log-probability of each turn's action under the model now."""
    with torch.no_grad():
        if score_mode:
            scored = score_candidates(model, None, [t.prompt_ids for t in turns], [t.candidate_ids for t in turns],
                                      tokenizer.pad_token_id, False, 1.0)
            return [float(scored["logprobs"][i, t.chosen_index]) for i, t in enumerate(turns)]
        scored = score_sequences(model, None, [t.prompt_ids for t in turns], [t.response_ids for t in turns],
                                 tokenizer.pad_token_id)
        return [float(scored["logprobs"][i, : len(t.response_ids)].sum()) for i, t in enumerate(turns)]


def one_update(model, ref, tokenizer, turns, score_mode, ppo, optimizer=None, value_only=False, streams=False):
    """The script's path from collected turns to one optimizer step (plain SGD unless `optimizer` is given); with
    `streams`, --context episode's losses over whole streams."""
    accelerator = Accelerator(gradient_accumulation_steps=ppo.gradient_accumulation_steps)
    options = {"ppo": ppo, "temperature": 1.0, "pad_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    if score_mode:
        batch = ppo_textworld.collate_decisions(turns)
        loss = ppo_textworld.stream_turn_loss if streams else ppo_textworld.turn_level_loss
        loss_fn = partial(loss, ref_model=ref, length_normalize=False, **options)
        estimate = ppo_textworld.turn_level_gae
    else:
        batch = ppo_textworld.collate_responses(turns, tokenizer.pad_token_id)
        loss_fn = partial(ppo_textworld.stream_token_loss if streams else ppo_textworld.token_level_loss, ref_model=ref,
                          **options)
        estimate = ppo_textworld.token_level_gae
    if ppo.advantage_estimator != "gae":
        estimate = ppo_textworld.CRITIC_FREE_ADVANTAGES[ppo.advantage_estimator]
    _, advantages, raw_advantages, returns = ppo_textworld.advantages_and_returns(turns, batch, estimate, ppo.kl_coef, ppo)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.SGD(parameters, lr=ppo.learning_rate)
    model.train()
    ppo_textworld.ppo_update(accelerator, model, optimizer, NonFiniteGuard(accelerator, 3), loss_fn, turns, batch,
                             advantages, returns, ppo=ppo, parameters=parameters, where="test", value_only=value_only,
                             units=ppo_textworld.stream_units(turns) if streams else None)
    model.eval()
    return raw_advantages


@pytest.mark.parametrize("score_mode", [False, True], ids=["generate", "score"])
@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whitened"])
@pytest.mark.parametrize("streams", [False, True], ids=["window", "episode"])
def test_one_update_raises_the_rewarded_action_and_lowers_the_punished_one(tiny_model_path, tokenizer, score_mode, whiten,
                                                                          streams):
    model, ref = fresh_model(tiny_model_path)
    turns = (score_mode_turns if score_mode else generate_mode_turns)(model, ref, tokenizer)
    if streams:  # --context episode: each one-turn episode is a stream of its own, its prompt the stream's start
        for index, turn_ in enumerate(turns):
            turn_.stream, turn_.stream_offset = index, 0
    before = chosen_logprobs(model, turns, tokenizer, score_mode)
    ppo = ppo_textworld.PPOArguments(
        learning_rate=0.01, ppo_epochs=1, num_minibatches=1, gradient_accumulation_steps=1, kl_coef=0.0, lam=1.0,
        whiten_advantages=whiten, max_grad_norm=1e9,
    )
    raw_advantages = one_update(model, ref, tokenizer, turns, score_mode, ppo, streams=streams)
    after = chosen_logprobs(model, turns, tokenizer, score_mode)
    # The advantage of a terminated one-turn episode with a value of 0 is its reward, on every token (lam 1).
    assert raw_advantages[:, 0].tolist() == pytest.approx(REWARDS)
    assert after[0] > before[0] + 1e-4, f"the rewarded action became less likely: {before[0]} -> {after[0]}"
    assert after[1] < before[1] - 1e-4, f"the punished action became likelier: {before[1]} -> {after[1]}"


# The two turns' advantages: grpo normalizes the returns 1 and -1 of the group; rloo subtracts the other's return;
# gigpo adds to grpo's, times --gigpo_step_weight 0.5, the same normalization of the turns' returns, both played from
# the group's start state.
CRITIC_FREE = {
    "grpo": ({}, 1 / math.sqrt(2)),
    "rloo": ({}, 2.0),
    "gigpo": ({"gigpo_step_weight": 0.5}, 1.5 / math.sqrt(2)),
}


@pytest.mark.parametrize("score_mode", [False, True], ids=["generate", "score"])
@pytest.mark.parametrize("estimator", list(CRITIC_FREE))
def test_one_critic_free_update_raises_the_better_episode_of_a_group(tiny_model_path, tokenizer, score_mode, estimator):
    """Without a value head: the two turns are two episodes of one group (same episode number) from the same start;
    the better one gains probability, the worse one loses it."""
    model, ref = fresh_model(tiny_model_path, with_value_head=False)
    turns = (score_mode_turns if score_mode else generate_mode_turns)(model, ref, tokenizer)
    for t in turns:
        t.episode = 0  # one group
    before = chosen_logprobs(model, turns, tokenizer, score_mode)
    options, advantage = CRITIC_FREE[estimator]
    ppo = ppo_textworld.PPOArguments(
        learning_rate=0.01, ppo_epochs=1, num_minibatches=1, gradient_accumulation_steps=1, kl_coef=0.0,
        max_grad_norm=1e9, advantage_estimator=estimator, group_size=2, **options,
    )
    raw_advantages = one_update(model, ref, tokenizer, turns, score_mode, ppo)
    assert raw_advantages[:, 0].tolist() == pytest.approx([advantage, -advantage], abs=1e-5)
    after = chosen_logprobs(model, turns, tokenizer, score_mode)
    assert after[0] > before[0] + 1e-4 and after[1] < before[1] - 1e-4


@pytest.mark.parametrize("score_mode", [False, True], ids=["generate", "score"])
@pytest.mark.parametrize("detach", [False, True], ids=["shared", "detached"])
def test_a_value_warmup_iteration_moves_the_value_head_alone(tiny_model_path, tokenizer, score_mode, detach):
    """--value_warmup_iterations 1 and --value_learning_rate: the script's parameter groups under AdamW; in the
    warm-up iteration the policy's weights stay exactly as they were (even where the value loss's gradient reaches
    the shared LM), the value head learns; with a detached head the policy's terms give the LM no gradient at all.
    The next iteration gives the policy its rate back."""
    model, ref = fresh_model(tiny_model_path)
    model.value_head.detach_input = detach
    turns = (score_mode_turns if score_mode else generate_mode_turns)(model, ref, tokenizer)
    ppo = ppo_textworld.PPOArguments(learning_rate=0.01, ppo_epochs=1, num_minibatches=1, gradient_accumulation_steps=1,
                                     kl_coef=0.0, lam=1.0, max_grad_norm=1e9, ent_coef=0.1, kl_loss_coef=0.1)
    assert len(ppo_textworld.parameter_groups(model, ppo.learning_rate, ppo_textworld.ValueHeadArguments())) == 1
    groups = ppo_textworld.parameter_groups(
        model, ppo.learning_rate, ppo_textworld.ValueHeadArguments(value_learning_rate=0.05, value_warmup_iterations=1))
    optimizer = build_optimizer(Accelerator(), groups, ppo.learning_rate, 2, 1, ppo.max_grad_norm)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.05]
    assert [len(group["params"]) for group in optimizer.param_groups] == [
        sum(p.requires_grad for p in model.policy.parameters()), len(list(model.value_head.parameters()))]
    policy = {name: p.detach().clone() for name, p in model.policy.named_parameters()}
    head = {name: p.detach().clone() for name, p in model.value_head.named_parameters()}

    assert ppo_textworld.warm_up_value_head(optimizer, 1, ppo.learning_rate, 1)
    one_update(model, ref, tokenizer, turns, score_mode, ppo, optimizer, value_only=True)
    assert all(torch.equal(p, policy[name]) for name, p in model.policy.named_parameters())
    assert any(not torch.equal(p, head[name]) for name, p in model.value_head.named_parameters())
    if detach:  # no policy term in the loss: the LM got no gradient, so AdamW kept no state for it
        assert not any(optimizer.state.get(p) for p in model.policy.parameters())

    assert not ppo_textworld.warm_up_value_head(optimizer, 2, ppo.learning_rate, 1)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.05]
    one_update(model, ref, tokenizer, turns, score_mode, ppo, optimizer)
    assert any(not torch.equal(p, policy[name]) for name, p in model.policy.named_parameters())


@pytest.mark.parametrize("score_mode", [False, True], ids=["generate", "score"])
def test_stream_losses_equal_the_window_losses_on_the_same_tokens(tiny_model_path, tokenizer, score_mode):
    """When each turn is a stream of its own (its prompt the stream's start), the --context episode losses read the
    tokens the window losses read: the same loss and figures, to float precision, and the same gradient."""
    model, ref = fresh_model(tiny_model_path)
    torch.nn.init.normal_(model.value_head.net.weight)  # values that differ per turn
    turns = (score_mode_turns if score_mode else generate_mode_turns)(model, ref, tokenizer)
    for index, turn_ in enumerate(turns):
        turn_.stream, turn_.stream_offset = index, 0
    ppo = ppo_textworld.PPOArguments(kl_loss_coef=0.1, ent_coef=0.01)
    options = {"ppo": ppo, "temperature": 0.7, "pad_id": tokenizer.pad_token_id, "device": torch.device("cpu")}
    if score_mode:
        batch = ppo_textworld.collate_decisions(turns)
        losses = [partial(loss, ref_model=ref, length_normalize=True, **options)
                  for loss in (ppo_textworld.turn_level_loss, ppo_textworld.stream_turn_loss)]
    else:
        batch = ppo_textworld.collate_responses(turns, tokenizer.pad_token_id)
        losses = [partial(loss, ref_model=ref, **options)
                  for loss in (ppo_textworld.token_level_loss, ppo_textworld.stream_token_loss)]
    advantages = torch.tensor([[1.0], [-0.5]]).expand_as(batch["mask"]) * batch["mask"]
    returns = advantages + 0.3
    index = torch.tensor([1, 0])  # a micro-batch in another order than the turns
    results = []
    for loss_fn in losses:
        model.zero_grad()
        loss, stats, _ = loss_fn(model, turns=turns, batch=batch, index=index, advantages=advantages, returns=returns)
        loss.backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), stats, gradient))
    (window_loss, window_stats, window_gradient), (stream_loss, stream_stats, stream_gradient) = results
    assert stream_loss == pytest.approx(window_loss, abs=1e-5)
    assert stream_stats.keys() == window_stats.keys()
    for key in window_stats:
        assert float(stream_stats[key]) == pytest.approx(float(window_stats[key]), abs=1e-5), key
    torch.testing.assert_close(stream_gradient, window_gradient, atol=1e-5, rtol=1e-4)
