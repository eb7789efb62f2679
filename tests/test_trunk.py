"""The shared trunk (lib/trunk.py): the reference reads the policy's frozen bottom layers, the rollout keeps their
states and the update starts from them; every number equals the one computed from scratch."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lib.models import decoder_layers, freeze_lower_layers, load_tokenizer
from lib.scoring import (
    candidate_logprobs,
    candidate_logprobs_packed,
    candidate_logprobs_shared,
    encode_candidates,
    score_candidates,
)
from lib.prompts import PromptConfig
from lib.training import frozen_copy
from lib.trunk import share_trunk, shared_layers, splits_exactly
from lib.value_head import PolicyWithValue, ValueHead

PROMPTS = ["You are in a cellar. There is a coin here.", "Kitchen. " * 9, "An attic with a window to the east."]
CANDIDATES = [["take coin", "go north", "examine the large wooden chest"], ["look"],
              ["open door", "inventory", "put the red apple on the kitchen table", "go west"]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def four_layer_models(tokenizer):
    """A 4-layer policy (bottom 2 frozen) with a value head whose top layers have moved away from the reference's,
    so that mixing up the two models' layers changes the numbers."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config).eval()
    reference = frozen_copy(policy)
    freeze_lower_layers(policy, 0.5)
    with torch.no_grad():
        for layer in decoder_layers(policy)[2:]:
            for parameter in layer.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    head = ValueHead(64)
    torch.nn.init.normal_(head.net.weight)
    return PolicyWithValue(policy, head), reference


def inputs(tokenizer):
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    return prompt_ids, encode_candidates(CANDIDATES, PromptConfig(format="plain"), tokenizer)


def test_share_trunk_gives_the_reference_the_policys_frozen_layers_and_keeps_its_outputs(tokenizer):
    model, reference = four_layer_models(tokenizer)
    ids = torch.tensor([inputs(tokenizer)[0][0]])
    before = reference(input_ids=ids).logits
    assert splits_exactly(model.policy, 2)
    assert share_trunk(model.policy, reference) == 2 == shared_layers(model.policy, reference)
    assert all(a is b for a, b in zip(decoder_layers(model.policy)[:2], decoder_layers(reference)[:2]))
    assert decoder_layers(model.policy)[2] is not decoder_layers(reference)[2]
    torch.testing.assert_close(reference(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_share_trunk_shares_nothing_when_the_bottom_layers_differ_or_all_train(tokenizer):
    model, reference = four_layer_models(tokenizer)
    with torch.no_grad():
        next(decoder_layers(reference)[0].parameters()).add_(1.0)
    assert share_trunk(model.policy, reference) == 0 == shared_layers(model.policy, reference)
    model, reference = four_layer_models(tokenizer)
    model.policy.requires_grad_(True)
    assert share_trunk(model.policy, reference) == 0
    assert share_trunk(model.policy, None) == 0


def test_shared_scoring_equals_the_two_models_scored_apart(tokenizer):
    model, reference = four_layer_models(tokenizer)
    prompt_ids, candidate_ids = inputs(tokenizer)
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        scores, values = candidate_logprobs(model.policy, prompt_ids, candidate_ids, pad, value_head=model.value_head)
        ref_scores = candidate_logprobs(reference, prompt_ids, candidate_ids, pad)
    layers = share_trunk(model.policy, reference)
    shared = candidate_logprobs_shared(model.policy, reference, layers, prompt_ids, candidate_ids, pad,
                                       value_head=model.value_head)
    for mine, theirs in [(shared["scores"], scores), (shared["ref_scores"], ref_scores)]:
        for a, b in zip(mine, theirs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared["values"], values, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.cat(shared["scores"]), torch.cat(shared["ref_scores"]), atol=1e-3)
    # Each state's kept trunk: its prompt's tokens, then its candidates' one after another.
    assert [len(t) for t in shared["trunks"]] == [len(p) + sum(map(len, c)) for p, c in zip(prompt_ids, candidate_ids)]


def test_the_update_from_kept_trunk_states_equals_the_update_from_scratch(tokenizer):
    """Scores, values and the gradient of the policy's top layers, from the rollout's kept trunk states (and the
    reference's scores for --kl_loss_coef), equal those of the forward from the tokens."""
    model, reference = four_layer_models(tokenizer)
    prompt_ids, candidate_ids = inputs(tokenizer)
    pad = tokenizer.pad_token_id
    layers = share_trunk(model.policy, reference)
    with torch.no_grad():
        acted = score_candidates(model, reference, prompt_ids, candidate_ids, pad, False, 1.0, trunk_layers=layers)
    results = []
    for trunks in (None, acted["trunks"]):
        model.zero_grad()
        scored = score_candidates(model, reference, prompt_ids, candidate_ids, pad, False, 1.0, trunk_layers=layers,
                                  trunks=trunks)
        (scored["logprobs"].sum() + scored["values"].sum()).backward()
        gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        results.append((scored, gradient))
    (scratch, scratch_gradient), (kept, kept_gradient) = results
    for key in ("logprobs", "values", "ref_logprobs"):
        torch.testing.assert_close(kept[key], scratch[key], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kept[key], acted[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kept_gradient, scratch_gradient, atol=1e-4, rtol=1e-4)


def test_kept_trunk_states_must_match_the_rows(tokenizer):
    model, reference = four_layer_models(tokenizer)
    prompt_ids, candidate_ids = inputs(tokenizer)
    layers = share_trunk(model.policy, reference)
    trunks = [torch.zeros(len(p) + sum(map(len, c)) + 1, 64) for p, c in zip(prompt_ids, candidate_ids)]
    with pytest.raises(ValueError, match="trunk states do not match"):
        candidate_logprobs_packed(model.policy, prompt_ids, candidate_ids, tokenizer.pad_token_id, trunks=trunks,
                                  trunk_layers=layers)


@pytest.mark.parametrize("context", ["window", "episode"])
def test_updates_from_kept_trunk_states_read_what_the_rollout_read(tiny_model_path, tiny_games, context):
    """Score-mode rollouts on real games with a reference sharing the policy's trunk (episode context: restarts at a
    small max_context_tokens, episode ends, three collect calls), then the update's forwards from the kept trunk
    states: every turn's behaviour log-probs, values and reference log-probs come back, and the reference's equal
    its own forward from the tokens."""
    import ppo_textworld
    from lib.env import BatchEnv
    from lib.models import load_model
    from lib.rewards import RewardConfig, reward_chain
    from lib.rollout import ScoringRolloutCollector
    from lib.scoring import ScoringConfig, pad_rows, policy_logprobs
    from lib.streams import candidate_scores, pack_stream_segments, stream_outputs

    policy = load_model(tiny_model_path).eval()
    reference = frozen_copy(policy)
    freeze_lower_layers(policy, 0.5)
    with torch.no_grad():
        for parameter in decoder_layers(policy)[1].parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(head.net.weight)
    model = PolicyWithValue(policy, head)
    layers = share_trunk(policy, reference)
    assert layers == 1
    tokenizer = load_tokenizer(tiny_model_path)
    env = BatchEnv(tiny_games, 2, max_episode_turns=4, shuffle=True, seed=0)
    collector = ScoringRolloutCollector(env, tokenizer, PromptConfig(max_prompt_tokens=200),
                                        ScoringConfig(temperature=0.8), reward_chain(RewardConfig()),
                                        max_context_tokens=280 if context == "episode" else None)
    torch.manual_seed(0)
    try:
        rollouts = [collector.collect(model, reference, 2) for _ in range(3)]
    finally:
        env.close()

    def chosen(scores, unit):
        logprobs = pad_rows([policy_logprobs(s, 0.8) for s in scores])
        return logprobs[torch.arange(len(unit)), torch.tensor([turns[i].chosen_index for i in unit])]

    restarts = 0
    for rollout in rollouts:
        turns = rollout.transitions
        assert all(t.trunk is not None for t in turns)
        restarts += sum(t.stream_offset == 0 and t.turn > 1 for t in turns if t.stream is not None)
        units = ppo_textworld.stream_units(turns) if context == "episode" else [[i] for i in range(len(turns))]
        for unit in units:
            with torch.no_grad():
                if context == "episode":
                    packed = pack_stream_segments(ppo_textworld.stream_segments(turns, torch.tensor(unit)), 0)
                    logits, values = model(stream=packed, trunk_layers=layers)
                    got = chosen(candidate_scores(logits, packed, False), unit)
                    ref_got = chosen(candidate_scores(stream_outputs(reference, packed, trunk_layers=layers)[0],
                                                      packed, False), unit)
                    ref_scratch = chosen(candidate_scores(stream_outputs(reference, packed)[0], packed, False), unit)
                else:
                    turn = turns[unit[0]]
                    kept = {"trunk_layers": layers, "trunks": [turn.trunk]}
                    scored = score_candidates(model, reference, [turn.prompt_ids], [turn.candidate_ids], 0, False,
                                              0.8, **kept)
                    scratch = score_candidates(model, reference, [turn.prompt_ids], [turn.candidate_ids], 0, False,
                                               0.8)
                    index = torch.tensor([[turn.chosen_index]])
                    got, values = scored["logprobs"].gather(1, index)[:, 0], scored["values"]
                    ref_got = scored["ref_logprobs"].gather(1, index)[:, 0]
                    ref_scratch = scratch["ref_logprobs"].gather(1, index)[:, 0]
            for mine, theirs in [(got, [turns[i].logprobs for i in unit]), (values, [turns[i].values for i in unit]),
                                 (ref_got, [turns[i].ref_logprobs for i in unit]), (ref_got, [ref_scratch])]:
                torch.testing.assert_close(mine, torch.cat(theirs), atol=1e-4, rtol=1e-4)
    assert restarts or context == "window"
