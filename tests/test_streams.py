"""Episode context (lib/streams.py): the cached, incremental forwards and the update's packed rows give the numbers a
from-scratch computation gives on the same tokens, for score and generate mode, through restarts and holes."""

import pytest
import torch

from lib.generation import GenerationConfig
from lib.prompts import PromptConfig, Turn, answer_text, render
from lib.scoring import candidate_logprobs_naive
from lib.streams import (
    SlotStreams,
    StreamCache,
    StreamFormat,
    candidate_turn,
    generate_turn,
    layout,
    pack_stream_segments,
    stream_outputs,
)
from lib.value_head import ValueHead


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.net.weight)  # a zero head would make every value test pass
    return model, tokenizer, head


def scratch_values(model, head, rows: list[list[int]]) -> torch.Tensor:
    """The value at each row's last token from a from-scratch forward of the row alone."""
    return torch.stack([head(model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]) for ids in rows])


def test_layout_positions_continue_the_main_line():
    assert layout([0, 0, 1, 1, 2, 0, 3, 3], 5) == [5, 6, 7, 8, 7, 7, 8, 9]


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_segment_continues_the_rendered_conversation(tiny, prompt_format):
    """start + answer + segment decodes to the text the window format renders for the same two turns."""
    _, tokenizer, _ = tiny
    config = PromptConfig(format=prompt_format, num_examples=0, hint=False)
    stream_format = StreamFormat(config, tokenizer)

    class State:
        observation, objective, inventory, admissible_commands = "A dark room.", "", "", []

    second = State()
    second.observation = "You see a coin."
    start = stream_format.start_ids(State(), [])
    answer = tokenizer(answer_text("go north", config, tokenizer), add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(start + answer + stream_format.segment_ids(answer, second))
    expected = render("", "You see a coin.\nWhat do you do?", [Turn("A dark room.\nWhat do you do?", "go north")], [],
                      config, tokenizer)
    assert text == expected


def test_unclosed_reply_gets_the_closing(tiny):
    _, tokenizer, _ = tiny
    stream_format = StreamFormat(PromptConfig(), tokenizer)

    class State:
        observation, objective, inventory, admissible_commands = "Hi.", "", "", []

    reply = tokenizer("go", add_special_tokens=False)["input_ids"]
    closed = reply + [tokenizer.eos_token_id]
    assert stream_format.segment_ids(reply, State()) == tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"] + stream_format.segment_ids(closed, State())


def random_ids(generator, length):
    return torch.randint(10, 2000, (length,), generator=generator).tolist()


def test_cached_candidate_turns_equal_scratch_scores(tiny):
    """Three turns of two slots (different lengths, a restart of slot 1 in turn 3): the cached turn's candidate
    scores and values equal those of the whole stream encoded from scratch (candidate_logprobs_naive), and the
    cache keeps the stream's tokens only."""
    model, _, head = tiny
    generator = torch.Generator().manual_seed(1)
    cache = StreamCache(2)
    streams, carried = [[], []], [[], []]  # carried: the chosen answer, which joins with the next turn's tokens
    with torch.no_grad():
        for turn in range(3):
            if turn == 2:  # row 1 restarts: a new stream whose old tokens must no longer be seen
                cache.reset(1)
                streams[1], carried[1] = [], []
            pending = [carried[row] + random_ids(generator, 7 + 3 * row + turn) for row in range(2)]
            candidates = [[random_ids(generator, 1 + k % 3) for k in range(2 + row)] for row in range(2)]
            scores, values = candidate_turn(model, cache, pending, candidates, length_normalize=False, value_head=head)
            assert all(cache.rows[row][0][0].shape[2] == cache.lengths[row] for row in range(2))
            for row in range(2):
                context = streams[row] + pending[row]
                naive = candidate_logprobs_naive(model, [context], [candidates[row]], 0)[0]
                torch.testing.assert_close(scores[row], naive, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(values[row], scratch_values(model, head, [context])[0], atol=1e-4, rtol=1e-4)
                assert cache.lengths[row] == len(context)
                carried[row] = candidates[row][turn % len(candidates[row])]
                streams[row] = context


def test_generate_turn_logprobs_equal_scratch(tiny):
    model, tokenizer, head = tiny
    generator = torch.Generator().manual_seed(2)
    cache, ref_cache = StreamCache(2), StreamCache(2)
    config = GenerationConfig(max_new_tokens=5, do_sample=True, temperature=0.7)
    torch.manual_seed(0)
    streams = [[], []]
    carried = [[], []]  # the last reply token, which the caches do not hold yet
    with torch.no_grad():
        for turn in range(2):
            pending = [carried[row] + random_ids(generator, 6 + 4 * row) for row in range(2)]
            results = generate_turn(model, model, cache, ref_cache, pending, config, tokenizer, value_head=head)
            for row in range(2):
                response = results[row]["response_ids"]
                context = streams[row] + pending[row]
                full = torch.tensor([context + response])
                logits = model(input_ids=full).logits[0, len(context) - 1 : len(context) - 1 + len(response)] / 0.7
                expected = torch.log_softmax(logits, -1)[torch.arange(len(response)), torch.tensor(response)]
                torch.testing.assert_close(results[row]["logprobs"], expected, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(results[row]["ref_logprobs"], expected, atol=1e-4, rtol=1e-4)
                hidden = model.get_decoder()(input_ids=full).last_hidden_state[0]
                torch.testing.assert_close(results[row]["values"],
                                           head(hidden[len(context) - 1 : len(context) - 1 + len(response)]),
                                           atol=1e-4, rtol=1e-4)
                streams[row] = context + response[:-1]
                carried[row] = response[-1:]
                assert cache.lengths[row] == len(streams[row]) == ref_cache.lengths[row]


def test_peek_leaves_the_stream_as_it_was(tiny):
    """A peek's tokens (keep False) and the candidates never stay in the cache: the next turn's scores are those of
    the stream alone, with length-normalized scores."""
    model, _, _ = tiny
    generator = torch.Generator().manual_seed(3)
    cache = StreamCache(1)
    context = []
    with torch.no_grad():
        for _ in range(3):
            pending = random_ids(generator, 5)
            candidates = [random_ids(generator, 20) for _ in range(3)]
            scores, _ = candidate_turn(model, cache, [pending], [candidates], length_normalize=True)
            cache.forward(model, 0, random_ids(generator, 7), keep=False)
            context += pending
            naive = candidate_logprobs_naive(model, [context], [candidates], 0, length_normalize=True)[0]
            torch.testing.assert_close(scores[0], naive, atol=1e-4, rtol=1e-4)
    assert cache.lengths[0] == len(context) == cache.rows[0][0][0].shape[2]


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_packed_segments_equal_the_rollout(tiny, mode):
    """pack_stream_segments + stream_outputs (the update's forward) give the logits and values of each turn on the
    same context as a from-scratch forward of the stream up to that turn."""
    model, _, head = tiny
    generator = torch.Generator().manual_seed(4)
    segments = []
    for length in (3, 2):
        turns = []
        for _ in range(length):
            candidates = [random_ids(generator, 1 + k) for k in range(3)]
            response = candidates[1] if mode == "score" else random_ids(generator, 4)
            turns.append({"prompt_ids": random_ids(generator, 6), "response_ids": response,
                          "candidate_ids": candidates if mode == "score" else None})
        segments.append({"turns": turns})
    packed = pack_stream_segments(segments, 0)
    with torch.no_grad():
        logits, values = stream_outputs(model, packed, head)
    logprobs = torch.log_softmax(logits, -1)[torch.arange(len(packed["targets"])), packed["targets"]]
    expected_logprobs, expected_values = [], []
    for segment in segments:
        context = []
        for turn in segment["turns"]:
            context += turn["prompt_ids"]
            expected_values.append(scratch_values(model, head, [context])[0])
            answers = turn["candidate_ids"] or [turn["response_ids"]]
            for answer in answers:
                full = torch.tensor([context + answer])
                step = torch.log_softmax(model(input_ids=full).logits[0, len(context) - 1 : -1], -1)
                expected_logprobs.append(step[torch.arange(len(answer)), torch.tensor(answer)])
            context += turn["response_ids"]
    torch.testing.assert_close(logprobs, torch.cat(expected_logprobs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, torch.stack(expected_values), atol=1e-4, rtol=1e-4)


def test_slot_streams_restart_when_full(tiny):
    _, tokenizer, _ = tiny
    config = PromptConfig(memory_turns=1, num_examples=0)
    stream_format = StreamFormat(config, tokenizer)

    class State:
        objective, inventory, admissible_commands = "Find the coin.", "", ["go north", "take coin"]

        def __init__(self, observation):
            self.observation = observation

    streams = SlotStreams(1, stream_format, max_context_tokens=160)
    ids, restarted = streams.begin_turn(0, State("Room one."), [], reply_room=10)
    assert restarted and streams.numbers[0] == 0
    reply = tokenizer(answer_text("go north", config, tokenizer), add_special_tokens=False)["input_ids"]
    history = []
    for step in range(10):
        streams.add_reply(0, reply, len(streams.ids[0]))
        history.append(Turn(f"Room {step}.", "go north"))
        ids, restarted = streams.begin_turn(0, State(f"Room {step + 1}."), history, reply_room=10)
        assert len(streams.ids[0]) + 10 <= 160
        if restarted:
            # the window prompt of this state with the last memory turn
            assert streams.ids[0] == stream_format.start_ids(State(f"Room {step + 1}."), history[-1:])
            assert streams.cached[0] == 0
            break
    else:
        pytest.fail("the stream never restarted")
    assert streams.numbers[0] == 1


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_update_reads_what_the_rollout_read(tiny, tiny_games, mode):
    """Three collect calls on real games with --context episode (restarts at a small max_context_tokens, episode
    ends, streams that start with each call): the update's packed forward (ppo_textworld.stream_segments) gives
    every turn's behaviour log-probs and values back."""
    import ppo_textworld
    from lib.env import BatchEnv
    from lib.rewards import RewardConfig, reward_chain
    from lib.rollout import RolloutCollector, ScoringRolloutCollector
    from lib.scoring import ScoringConfig, pad_rows, policy_logprobs
    from lib.streams import candidate_scores
    from lib.value_head import PolicyWithValue

    model, tokenizer, head = tiny
    policy = PolicyWithValue(model, head)
    config = PromptConfig(max_prompt_tokens=200)
    env = BatchEnv(tiny_games, 2, max_episode_turns=4, shuffle=True, seed=0)
    reward_fn = reward_chain(RewardConfig())
    if mode == "score":
        collector = ScoringRolloutCollector(env, tokenizer, config, ScoringConfig(temperature=0.8), reward_fn,
                                            max_context_tokens=280)
    else:
        collector = RolloutCollector(env, tokenizer, config, GenerationConfig(max_new_tokens=4, temperature=0.8),
                                     reward_fn, max_context_tokens=280)
    torch.manual_seed(0)
    try:
        rollouts = [collector.collect(policy, model, 2) for _ in range(3)]
    finally:
        env.close()
    restarts = 0
    for rollout in rollouts:
        turns = rollout.transitions
        restarts += sum(t.stream_offset == 0 and t.turn > 1 for t in turns)  # a stream restarted mid-episode
        for unit in ppo_textworld.stream_units(turns):
            index = torch.tensor(unit)
            packed = pack_stream_segments(ppo_textworld.stream_segments(turns, index), 0)
            with torch.no_grad():
                if mode == "score":
                    logits, values = policy(stream=packed)
                    logprobs = pad_rows([policy_logprobs(s, 0.8) for s in candidate_scores(logits, packed, False)])
                    chosen = torch.tensor([turns[i].chosen_index for i in unit])
                    got = logprobs[torch.arange(len(unit)), chosen]
                    expected = torch.cat([turns[i].logprobs for i in unit])
                    expected_values = torch.cat([turns[i].values for i in unit])
                else:
                    logits, values = policy(stream=packed, values_at="logits_at")
                    token_logprobs = torch.log_softmax(logits / 0.8, -1)[torch.arange(len(packed["targets"])),
                                                                          packed["targets"]]
                    got, expected = token_logprobs, torch.cat([turns[i].logprobs for i in unit])
                    expected_values = torch.cat([turns[i].values for i in unit])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(values, expected_values, atol=1e-4, rtol=1e-4)
    assert restarts
    first_turns = [t for rollout in rollouts for t in rollout.transitions[:2]]
    assert all(t.stream_offset == 0 for t in first_turns)  # every iteration starts new streams


def test_peek_value_reads_the_state_on_the_stream_and_changes_nothing(tiny):
    """A truncated episode's final state is valued as the next turn of its stream would read it (the reply the
    caches lack, then the state's segment), and the stream and its cache stay as they were."""
    from lib.streams import EpisodeContext
    from lib.value_head import PolicyWithValue

    model, tokenizer, head = tiny
    policy = PolicyWithValue(model, head)
    context = EpisodeContext(1, PromptConfig(), tokenizer, max_context_tokens=1024)

    class State:
        objective, inventory, admissible_commands = "Find the coin.", "", ["go north", "take coin"]

        def __init__(self, observation):
            self.observation = observation

    candidates = encode_candidates_for(tokenizer, ["go north", "take coin"])
    with torch.no_grad():
        context.begin(0, State("A hall."), [], reply_room=8)
        candidate_turn(model, context.cache, context.pending([0]), [candidates], length_normalize=False)
        context.streams.add_reply(0, candidates[1], cached=len(context.streams.ids[0]))
        ids, length = list(context.streams.ids[0]), context.cache.lengths[0]
        value = context.peek_value(policy, 0, State("You see a coin."))
        expected = scratch_values(model, head, [ids + context.streams.format.segment_ids(candidates[1], State("You see a coin."))])
    assert value == pytest.approx(float(expected[0]), abs=1e-4)
    assert context.streams.ids[0] == ids and context.cache.lengths[0] == length


def encode_candidates_for(tokenizer, commands):
    from lib.scoring import encode_candidates

    return encode_candidates([commands], PromptConfig(), tokenizer)[0]
