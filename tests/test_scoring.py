import copy
import json
import math

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoConfig, AutoModelForCausalLM

import play
from lib.agents import (
    EpisodeScoringAgent,
    ScoringAgent,
    candidate_commands,
    past_turn,
    played_at,
    way_back,
)
from lib.env import GameState, StepResult
from lib.models import load_model, load_tokenizer
from lib.prompts import EXAMINE_VERBS, PromptConfig, Turn, build_prompt
from lib.scoring import (
    ScoringConfig,
    candidate_logprobs,
    candidate_logprobs_naive,
    candidate_logprobs_packed,
    choose_candidate,
    encode_candidates,
    policy_logprobs,
    select_candidates,
)

TRANSCRIPT_COLUMNS = {"game", "env", "episode", "turn", "prompt", "response", "command", "observation", "reward", "score",
                      "max_score", "done", "won", "invalid", "candidates", "chosen_index"}
CANDIDATES = [
    ["take coin", "go north", "examine the large wooden chest of drawers"],
    ["look"],
    ["open door", "inventory", "put the red apple on the kitchen table", "go west"],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    return load_model(tiny_model_path), load_tokenizer(tiny_model_path)


def prompts_of_different_lengths(tokenizer, config: PromptConfig) -> list[str]:
    observations = ["You are in a cellar.", "You are in a kitchen. " * 6, "A small attic with a window to the east."]
    return [build_prompt("Find the coin.", observation, "", commands, [], config, tokenizer)
            for observation, commands in zip(observations, CANDIDATES)]


def one_by_one(model, prompt_ids, candidate_ids, length_normalize, gap=0):
    """Each candidate alone after its prompt: one unpadded sequence per forward, no batching, no cache. `gap` > 0
    places the candidate that many positions too late after its prompt (a deliberate position error)."""
    scores = []
    for prompt, candidates in zip(prompt_ids, candidate_ids):
        row = []
        for candidate in candidates:
            positions = list(range(len(prompt))) + list(range(len(prompt) + gap, len(prompt) + gap + len(candidate)))
            logits = model(input_ids=torch.tensor([prompt + candidate]),
                           position_ids=torch.tensor([positions])).logits[0, len(prompt) - 1 : -1]
            total = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(candidate)[:, None]).sum()
            row.append(total / len(candidate) if length_normalize else total)
        scores.append(torch.stack(row))
    return scores


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_cached_scoring_equals_naive_and_unbatched(tiny, prompt_format, length_normalize):
    model, tokenizer = tiny
    config = PromptConfig(format=prompt_format)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in prompts_of_different_lengths(tokenizer, config)]
    candidate_ids = encode_candidates(CANDIDATES, config, tokenizer)
    assert len({len(ids) for ids in prompt_ids}) == 3  # left padding differs per prompt
    assert len({len(ids) for rows in candidate_ids for ids in rows}) >= 4  # and right padding per candidate
    with torch.no_grad():
        cached = candidate_logprobs(model, prompt_ids, candidate_ids, tokenizer.pad_token_id, length_normalize)
        naive = candidate_logprobs_naive(model, prompt_ids, candidate_ids, tokenizer.pad_token_id, length_normalize)
        packed = candidate_logprobs_packed(model, prompt_ids, candidate_ids, tokenizer.pad_token_id, length_normalize)
        reference = one_by_one(model, prompt_ids, candidate_ids, length_normalize)
    assert [len(s) for s in cached] == [len(s) for s in packed] == [len(c) for c in CANDIDATES]
    for c, n, p, r in zip(cached, naive, packed, reference):
        torch.testing.assert_close(c, r, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(n, r, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p, r, atol=1e-4, rtol=1e-5)
    assert all(torch.isfinite(s).all() and (s < 0).all() for s in cached)


@pytest.fixture(scope="module")
def position_sensitive(tiny_model_path):
    """The tiny model's architecture initialised with std 0.4 instead of 0.02: sharp attention and peaked logits. The
    tiny model itself attends almost uniformly: a candidate placed one position late moves its scores by 5e-4 at
    most, about the tolerance of the equality tests, which then catch an off-by-one by luck if at all."""
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.initializer_range = 0.4
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_scoring_paths_agree_on_a_model_where_a_position_error_shows(tiny, position_sensitive, prompt_format):
    """Cached, packed and naive scoring equal one-by-one scoring on left-padded prompts of different lengths, on a
    model where every candidate placed one position late scores far outside the tolerance: a position bug in any
    path fails. (RoPE sees relative positions only: what matters is where a candidate starts after its prompt.)"""
    _, tokenizer = tiny
    model = position_sensitive
    config = PromptConfig(format=prompt_format)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"]
                  for p in prompts_of_different_lengths(tokenizer, config)]
    candidate_ids = encode_candidates(CANDIDATES, config, tokenizer)
    with torch.no_grad():
        reference = torch.cat(one_by_one(model, prompt_ids, candidate_ids, False))
        one_late = torch.cat(one_by_one(model, prompt_ids, candidate_ids, False, gap=1))
        scores = {score.__name__: torch.cat(score(model, prompt_ids, candidate_ids, tokenizer.pad_token_id))
                  for score in (candidate_logprobs, candidate_logprobs_naive, candidate_logprobs_packed)}
    atol, rtol = 1e-4, 1e-5
    assert ((one_late - reference).abs() > 100 * (atol + rtol * reference.abs())).all()
    for name, path_scores in scores.items():
        torch.testing.assert_close(path_scores, reference, atol=atol, rtol=rtol,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def test_cached_and_packed_scoring_gradients_equal_naive(tiny):
    """Training can score with gradients: the cache (or the packed row) carries them back to the prompt's forward;
    the packed scores' values come from the prompt's last token as the cached ones do."""
    model, tokenizer = tiny
    prompt_ids = [[1, 20, 30, 40, 50], [60, 70]]
    candidate_ids = [[[5, 6, 2], [7, 2]], [[8, 9, 10, 2]]]
    head = torch.nn.Linear(model.config.hidden_size, 1)
    gradients, values = [], []
    for score in (candidate_logprobs, candidate_logprobs_naive, candidate_logprobs_packed):
        model.zero_grad()
        scores = score(model, prompt_ids, candidate_ids, tokenizer.pad_token_id)
        torch.cat(scores).sum().backward()
        gradients.append(model.get_input_embeddings().weight.grad.clone())
        if score is not candidate_logprobs_naive:
            values.append(score(model, prompt_ids, candidate_ids, tokenizer.pad_token_id, value_head=head)[1])
    model.zero_grad()
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gradients[2], gradients[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-4)
    assert gradients[0][20].abs().sum() > 0  # a prompt token's embedding gets gradient through the cache


def test_encode_candidates_ends_each_answer_like_the_prompt_format(tiny):
    _, tokenizer = tiny
    chat = encode_candidates([["take coin"]], PromptConfig(format="chat"), tokenizer)[0][0]
    plain = encode_candidates([["take coin"]], PromptConfig(format="plain"), tokenizer)[0][0]
    assert chat[-1] == tokenizer.eos_token_id and tokenizer.decode(chat[:-1]) == "take coin"
    assert tokenizer.decode(plain) == "take coin\n"


def test_scoring_needs_a_candidate_per_prompt(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="at least one candidate"):
        candidate_logprobs(model, [[1, 2], [3]], [[[4]], []], tokenizer.pad_token_id)


def test_candidate_cap_leaves_examine_commands_for_last():
    commands = ["close chest", "examine chest", "go east", "inventory", "look", "open chest", "take coin"]
    assert select_candidates(commands, 7) == commands
    # Over the cap: examine/look/inventory get what the other verbs leave; the order is kept.
    assert select_candidates(commands, 6) == ["close chest", "examine chest", "go east", "inventory", "open chest",
                                              "take coin"]
    assert select_candidates(commands, 5) == ["close chest", "examine chest", "go east", "open chest", "take coin"]
    assert select_candidates(commands, 4) == ["close chest", "go east", "open chest", "take coin"]
    assert select_candidates(commands, 2) == ["close chest", "go east"]


def test_candidate_cap_takes_verbs_in_turn_the_mentioned_objects_first():
    """A ScienceWorld-like list (alphabetical, one verb's combinations crowding the front): over the cap every verb
    gets a turn, and within a verb the commands whose objects the state's text mentions come first, then the
    shortest."""
    commands = (["focus on air", "focus on dove", "focus on orange", "focus on picture"]
                + ["go to bedroom", "go to kitchen"]
                + [f"move {thing} to {place}" for thing in ("air", "dove", "orange") for place in ("red box", "sink")]
                + ["look around", "look at dove"])
    context = "Your task is to find a living thing, then move it to the red box in the kitchen. You see a dove."
    kept = select_candidates(commands, 6, context=context)
    assert kept == ["focus on air", "focus on dove", "go to bedroom", "go to kitchen", "move air to red box",
                    "move dove to red box"]
    # Without a text, the shortest of each verb in the game's order: still every verb.
    assert select_candidates(commands, 3) == ["focus on air", "go to bedroom", "move air to sink"]
    assert select_candidates(commands, 3, context="the kitchen sink") == ["focus on air", "go to kitchen",
                                                                           "move air to sink"]


def test_choose_candidate_greedy_and_sampled():
    scores = torch.tensor([-3.0, -1.0, -2.0, -1.5])
    assert choose_candidate(scores, do_sample=False) == 1
    generator = torch.Generator().manual_seed(0)
    # Temperature towards 0: the softmax puts all mass on the best candidate, sampling equals argmax.
    assert {choose_candidate(scores, True, 1e-4, generator) for _ in range(200)} == {1}
    draws = 4000
    for temperature in (1.0, 3.0):
        counts = torch.bincount(torch.tensor([choose_candidate(scores, True, temperature, generator)
                                              for _ in range(draws)]), minlength=4)
        expected = torch.softmax(scores / temperature, -1)
        assert (counts / draws - expected).abs().max() < 0.03
    assert math.isclose(float(policy_logprobs(scores, 2.0).exp().sum()), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(policy_logprobs(scores, 2.0), torch.log_softmax(scores / 2, -1))


def test_scoring_config_checks():
    with pytest.raises(ValueError, match="max_candidates"):
        ScoringConfig(max_candidates=0)
    with pytest.raises(ValueError, match="temperature"):
        ScoringConfig(do_sample=True, temperature=0)
    ScoringConfig(do_sample=False, temperature=0)  # greedy ignores the temperature


def game_state(admissible: list[str]) -> GameState:
    return GameState(game="g.z8", episode=0, observation="A cellar.", score=0, max_score=1, moves=0, won=False,
                     lost=False, admissible_commands=admissible, objective="Get the coin.",
                     inventory="You are carrying nothing.", walkthrough=None)


def test_scoring_agent_skips_idle_slots_and_falls_back(tiny):
    model, tokenizer = tiny
    config = PromptConfig()
    agent = ScoringAgent(model, tokenizer, config, ScoringConfig(max_candidates=2))
    states = [None, game_state(["examine coin", "go west", "take coin"]), game_state([])]
    prompts = [None] + [build_prompt(s.objective, s.observation, s.inventory, s.admissible_commands, [], config,
                                     tokenizer) for s in states[1:]]
    commands = agent.act(states, prompts)
    assert commands[0] is None and agent.transcript_columns(0) == {"candidates": None, "chosen_index": None}
    assert agent.candidates[1] == ["go west", "take coin"] and commands[1] in agent.candidates[1]
    assert agent.candidates[1][agent.chosen[1]] == commands[1]
    assert commands[2] == "look" and agent.transcript_columns(2) == {"candidates": ["look"], "chosen_index": 0}
    assert agent.act([None], [None]) == [None]


def test_played_at_counts_a_place_its_way_back_and_what_changed_nothing():
    history = [
        Turn("A cellar.", "look", place="cellar", changed=False),  # changed nothing: counts in every place
        Turn("A cellar.", "go east", place="cellar"),  # into the hall: its way back, "go west", counts there
        Turn("A hall.", "open box", place="hall"),
        Turn("A hall.", "go north", place="hall"),  # into the attic: "go south" counts there
        Turn("An attic.", "go south", place="attic"),  # back into the hall: "go north" counts there
    ]
    assert played_at("cellar", history[:1]) == ["look"]
    assert played_at("hall", history[:2]) == ["look", "go west"]
    assert played_at("attic", history[:4]) == ["look", "go south"]
    assert played_at("hall", history) == ["look", "go west", "open box", "go north", "go north"]
    back_west = history + [Turn("A hall.", "go west", place="hall")]  # into the cellar: "go east" counts there
    assert played_at("cellar", back_west) == ["look", "go east", "go east"]
    assert [way_back(command) for command in ("go east", "go northeast", "climb up", "take coin")] == [
        "go west", "go southwest", "climb down", None]


def test_past_turn_knows_its_place_and_whether_it_changed_anything():
    cellar = game_state(["go west", "look"])
    cellar.location = "cellar"
    looked = copy.copy(cellar)
    looked.observation = "-= Cellar =-\nA cellar, again."  # the answer differs; the place and what can be done do not
    turn = past_turn(cellar, "look", looked)
    assert (turn.observation, turn.command, turn.place, turn.changed) == ("A cellar.", "look", "cellar", False)
    for field, value in (("location", "attic"), ("score", 1), ("inventory", "a coin"), ("admissible_commands", [])):
        after = copy.copy(cellar)
        setattr(after, field, value)
        assert past_turn(cellar, "take coin", after).changed, field
    unnamed = game_state(["look"])  # an engine that names no location: the cleaned observation is the place
    assert past_turn(unnamed, "look", unnamed).place == "A cellar."


def test_candidate_commands_with_played_ones_keep_the_least_played():
    state = game_state(["examine coin", "go west", "take coin"])
    assert candidate_commands(state, 32, played=["take coin", "look"]) == ["examine coin", "go west"]
    assert candidate_commands(state, 1, played=["take coin"]) == ["go west"]  # the cap applies to the untried ones
    every_one_once = state.admissible_commands
    assert candidate_commands(state, 32, played=every_one_once) == state.admissible_commands
    assert candidate_commands(state, 32, played=every_one_once + ["take coin", "go west"]) == ["examine coin"]


@pytest.mark.parametrize("context", ["window", "episode"])
def test_scoring_agent_with_least_tried_plays_each_command_of_a_place_once(tiny, context):
    """A greedy choice in an unchanged state would repeat itself forever; with least_tried the agent plays every
    admissible command of a place once before any twice, and forgets with the episode's end."""
    model, tokenizer = tiny
    config = PromptConfig()
    admissible = ["examine coin", "go west", "take coin"]
    cellar, attic, hall = game_state(admissible), game_state(admissible), game_state([])
    cellar.location, attic.location, hall.location = "cellar", "attic", "hall"
    prompt = build_prompt(cellar.objective, cellar.observation, cellar.inventory, admissible, [], config, tokenizer)

    def play(agent, state, done=False):
        command = agent.act([state], [prompt])[0]
        agent.observe([StepResult(command, 0.0, done, False, hall, hall)])  # each command leads to the hall
        return command, agent.candidates[0]

    def make_agent(scoring_config):
        if context == "episode":
            return EpisodeScoringAgent(model, tokenizer, config, scoring_config, max_context_tokens=2048)
        return ScoringAgent(model, tokenizer, config, scoring_config)

    agent = make_agent(ScoringConfig(least_tried=True))
    play(agent, cellar)
    assert play(agent, attic)[1] == admissible  # the same text, another room: nothing tried there
    agent = make_agent(ScoringConfig(least_tried=True))
    played = [play(agent, cellar) for _ in range(3)]
    assert sorted(command for command, _ in played) == sorted(admissible)
    assert [len(candidates) for _, candidates in played] == [3, 2, 1]
    assert play(agent, attic)[1] == admissible  # another place: nothing tried there
    assert play(agent, cellar)[1] == admissible  # every command tried here once: a second round
    assert len(play(agent, cellar, done=True)[1]) == 2
    assert [len(play(agent, cellar)[1]) for _ in range(2)] == [3, 2]  # a new episode: from scratch
    greedy = make_agent(ScoringConfig())
    assert len({play(greedy, cellar)[0] for _ in range(3)}) <= 2  # without it: the same command every turn


def test_play_score_mode_end_to_end(tiny_model_path, tiny_games, tmp_path, capsys):
    out = tmp_path / "score"
    code = play.main(["--agent", "model", "--action_mode", "score", "--model_name_or_path", tiny_model_path,
                      "--games", ",".join(tiny_games), "--num_episodes", "3", "--max_episode_turns", "3",
                      "--max_candidates", "3", "--do_sample", "--temperature", "2", "--output_dir", str(out)])
    assert code == 0
    assert "all (model-score)" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["agent"] == "model-score" and report["episodes"] == 3
    assert report["args"]["action_mode"] == "score" and report["invalid_rate"] == 0.0
    transcripts = load_from_disk(str(out / "transcripts"))
    assert set(transcripts.column_names) == TRANSCRIPT_COLUMNS
    assert len(transcripts) == round(report["mean_steps"] * 3)
    for turn in transcripts:
        assert 1 <= len(turn["candidates"]) <= 3
        assert turn["command"] == turn["response"] == turn["candidates"][turn["chosen_index"]]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--action_mode", "beam"], "--action_mode"),
        (["--action_mode", "score", "--max_candidates", "0"], "max_candidates"),
        (["--action_mode", "score", "--do_sample", "--temperature", "0"], "temperature"),
        (["--action_mode", "generate", "--least_tried"], "--least_tried"),
    ],
)
def test_play_score_mode_bad_flags(args, flag, tiny_games, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded a model or games despite bad flags")

    monkeypatch.setattr(play, "load_model", forbidden)
    monkeypatch.setattr(play, "resolve_games", forbidden)
    assert play.main(args + ["--games", ",".join(tiny_games)]) == 2
    assert flag in capsys.readouterr().err


def test_candidate_cap_on_real_scienceworld_states_gives_every_verb_a_turn():
    """ScienceWorld lists 100-1000 valid actions alphabetically: the kept 32 must span every verb that acts (fewer
    than 32 here), not the first verbs of the alphabet (those would be close, eat, focus and go only)."""
    from lib.engines import ScienceEngine

    engine = ScienceEngine()
    try:
        answers = [engine.reset("sciworld:find-living-thing:0:easy"), engine.step("go to greenhouse")]
    finally:
        engine.close()
    for answer in answers:
        state = GameState("g", 0, answer["observation"], 0.0, 1.0, 0, False, False, answer["admissible_commands"],
                          answer["objective"], answer["inventory"], None)
        kept = candidate_commands(state, 32)
        verbs = {command.split(" ")[0] for command in state.admissible_commands} - set(EXAMINE_VERBS)
        assert len(state.admissible_commands) > 100 and len(kept) == 32
        assert {command.split(" ")[0] for command in kept} >= verbs
