import copy
import json

import pytest
from datasets import load_from_disk

import lib.prompts
import play
from lib.env import BatchEnv
from lib.models import fit_tokenizer_to_model, load_model, load_tokenizer
from lib.prompts import (
    ANSWER_TOKENS,
    EXAMPLE_TURNS,
    FALLBACK_CONTEXT_TOKENS,
    OBSERVATION_TOKENS,
    PromptConfig,
    Turn,
    build_prompt,
    clean_inventory,
    clean_observation,
    context_tokens,
    instruction_tokens,
    parse_command,
)

OBJECTIVE = "Find the coin."
ADMISSIBLE = ["examine coin", "go east", "inventory", "look", "take coin"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def first_states(small_games):
    """The real first state of a coin-collector game and the state after one move."""
    with BatchEnv(small_games[:1], num_envs=1) as env:
        start = env.reset()[0]
        moved = env.step([start.walkthrough[0]])[0].state
    return start, moved


def length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def history(n: int) -> list[Turn]:
    return [Turn(f"You are in room number {i}. It is a plain room.", f"go door {i}") for i in range(1, n + 1)]


def test_clean_observation_on_real_game_text(first_states):
    start, moved = first_states
    raw = start.observation
    assert "$$" in raw and "-= " in raw and start.objective in raw and raw.rstrip().endswith("0/1")
    cleaned = clean_observation(raw, start.objective)
    assert cleaned.startswith("You find yourself in")
    for gone in ("$$", "\\", "-= ", start.objective, "0/1", ">"):
        assert gone not in cleaned
    assert "\n\n\n" not in cleaned and cleaned == cleaned.strip()
    # After a move: the new room's text stays, its header and the status line go.
    after = clean_observation(moved.observation, moved.objective)
    assert "coin" in after and "-=" not in after and not after.endswith("/2")
    assert clean_inventory(start.inventory) == ""
    assert clean_inventory("  You are carrying: a coin  ") == "You are carrying: a coin"


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_memory_keeps_the_last_turns_oldest_first(tokenizer, prompt_format):
    config = PromptConfig(format=prompt_format, memory_turns=3, max_prompt_tokens=2048)
    prompt = build_prompt(OBJECTIVE, "A dark room.", "", ADMISSIBLE, history(5), config, tokenizer)
    assert "room number 1." not in prompt and "room number 2." not in prompt
    positions = [prompt.index(f"room number {i}.") for i in (3, 4, 5)]
    assert positions == sorted(positions)
    assert positions[-1] < prompt.index("A dark room.")
    none = build_prompt(OBJECTIVE, "A dark room.", "", ADMISSIBLE, history(5), PromptConfig(
        format=prompt_format, memory_turns=0, max_prompt_tokens=2048), tokenizer)
    assert "room number" not in none


def test_token_budget_drops_the_oldest_memory_first(tokenizer):
    config = PromptConfig(format="plain", memory_turns=3, max_prompt_tokens=2048)
    full = build_prompt(OBJECTIVE, "A dark room.", "", ADMISSIBLE, history(3), config, tokenizer)
    without_oldest = build_prompt(OBJECTIVE, "A dark room.", "", ADMISSIBLE, history(3)[1:], config, tokenizer)
    budget = length(tokenizer, without_oldest)
    assert length(tokenizer, full) > budget
    tight = PromptConfig(format="plain", memory_turns=3, max_prompt_tokens=budget)
    prompt = build_prompt(OBJECTIVE, "A dark room.", "", ADMISSIBLE, history(3), tight, tokenizer)
    assert prompt == without_oldest
    assert "room number 1." not in prompt and "room number 3." in prompt

    # Past the memory the observation's tail goes, and the prompt still fits.
    long_observation = "A dark room. " + "The walls are covered in strange writing. " * 40
    small = PromptConfig(format="plain", memory_turns=3, max_prompt_tokens=120)
    cut = build_prompt(OBJECTIVE, long_observation, "", ADMISSIBLE, history(3), small, tokenizer)
    assert length(tokenizer, cut) <= 120
    assert "room number" not in cut and "A dark room." in cut and cut.endswith("> ")


def test_a_hint_longer_than_the_budget_lists_the_commands_by_priority(tokenizer):
    """ScienceWorld-like: one verb's combinations fill the front of the alphabetical list; the budget keeps every
    verb's most relevant commands (lib.prompts.by_priority), in the game's order."""
    commands = sorted([f"move {thing} to {place}" for thing in ("air", "apple", "dove", "picture", "orange")
                       for place in ("red box", "blue box", "sink", "table", "counter")]
                      + ["focus on dove", "focus on air", "go to kitchen", "go to bedroom", "pick up dove"])
    config = PromptConfig(format="plain", memory_turns=0, num_examples=0, max_prompt_tokens=150)
    prompt = build_prompt("Put the dove in the red box.", "A kitchen. You see a dove.", "", commands, [], config,
                          tokenizer)
    assert length(tokenizer, prompt) <= 150
    listed = prompt.split("Possible actions: ")[1].split("\n")[0].split(", ")
    assert 5 <= len(listed) < len(commands) and listed == [c for c in commands if c in listed]
    assert {"focus on dove", "go to kitchen", "move dove to red box", "pick up dove"} <= set(listed)
    assert "move picture to counter" not in listed  # nothing of it mentioned


def test_hint_and_examine_filtering(tokenizer):
    def prompt_with(**options):
        config = PromptConfig(format="plain", max_prompt_tokens=2048, **options)
        return build_prompt(OBJECTIVE, "A room.", "You are carrying: a key", ADMISSIBLE, [], config, tokenizer)

    hinted = prompt_with()
    assert "Possible actions: go east, take coin\n" in hinted
    assert "Inventory: You are carrying: a key" in hinted
    assert "Possible actions: examine coin, go east, inventory, look, take coin\n" in prompt_with(hint_examine=True)
    assert "Possible actions" not in prompt_with(hint=False)
    examples = prompt_with(num_examples=2)
    assert all(observation in examples and f"> {command}\n" in examples for observation, command in EXAMPLE_TURNS)


def test_chat_template_and_plain_fallback(tokenizer):
    chat = build_prompt(OBJECTIVE, "A room.", "", ADMISSIBLE, history(1), PromptConfig(format="chat", num_examples=0), tokenizer)
    plain_config = PromptConfig(format="plain", num_examples=0)
    plain = build_prompt(OBJECTIVE, "A room.", "", ADMISSIBLE, history(1), plain_config, tokenizer)
    assert tokenizer.chat_template
    assert chat.count("<|im_start|>user") == 2 and chat.count("<|im_start|>assistant") == 2
    assert "go door 1<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>" not in plain and plain.endswith("What do you do?\n> ")
    assert plain.startswith("You are playing a text adventure game.") and f"Goal: {OBJECTIVE}" in plain
    assert "room number 1. It is a plain room.\n> go door 1\n\n" in plain
    templateless = copy.deepcopy(tokenizer)
    templateless.chat_template = None
    fallback = build_prompt(OBJECTIVE, "A room.", "", ADMISSIBLE, history(1), PromptConfig(format="chat", num_examples=0), templateless)
    assert fallback == plain


@pytest.mark.parametrize(
    "text, command",
    [
        ("take coin", "take coin"),
        ("Take Coin.", "take coin"),
        ("  > go north!\nand then something else", "go north"),
        (">open door", "open door"),
        ("go west...?", "go west"),
        ("'examine box'", "'examine box"),
        ("", ""),
        ("\nlook", ""),
        ("   ", ""),
    ],
)
def test_parse_command(text, command):
    assert parse_command(text) == command


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "xml"}, "unknown prompt format"),
        ({"memory_turns": -1}, "memory_turns must be >= 0"),
        ({"num_examples": len(EXAMPLE_TURNS) + 1}, "num_examples in"),
        ({"max_prompt_tokens": 8}, "at least 32"),
    ],
)
def test_prompt_config_rejects_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**options)


@pytest.fixture(scope="module")
def long_goal_state(games_cache):
    """The first state of a level-20 coin collector: its goal spells out a route of 20 rooms (about 200 tokens)."""
    from lib.games import resolve_games

    games = resolve_games("tw-coin_collector:level=20:n=1", "train", games_cache, progress=False)
    with BatchEnv(games, num_envs=1) as env:
        return games[0], env.reset()[0]


def fixed_part(tokenizer, objective, inventory, config) -> int:
    """Tokens of the prompt that cannot be cut: the instruction, the goal, the inventory, the question."""
    return length(tokenizer, build_prompt(objective, "", inventory, [], [], PromptConfig(
        format=config.format, memory_turns=0, hint=False, num_examples=0, max_prompt_tokens=4096), tokenizer))


@pytest.mark.parametrize("prompt_format", ["chat", "plain"])
def test_a_goal_over_the_budget_grows_it_by_room_for_the_observation_and_says_so_once(tokenizer, long_goal_state,
                                                                                   prompt_format, monkeypatch, capsys):
    monkeypatch.setattr(lib.prompts, "_warned_of_long_goals", False)
    _, state = long_goal_state
    config = PromptConfig(format=prompt_format)  # the defaults: 256 tokens
    observation = clean_observation(state.observation, state.objective)
    needed = fixed_part(tokenizer, state.objective, state.inventory, config)
    assert needed > config.max_prompt_tokens
    prompt = build_prompt(state.objective, observation, state.inventory, state.admissible_commands, history(3), config,
                          tokenizer)
    assert needed < length(tokenizer, prompt) <= needed + OBSERVATION_TOKENS
    assert state.objective in prompt and observation[:40] in prompt and "room number" not in prompt
    again = build_prompt(state.objective, observation, state.inventory, state.admissible_commands, [], config, tokenizer)
    assert again == prompt  # the memory had to go anyway
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "--max_prompt_tokens 256" in warnings[0]


def test_a_grown_budget_stops_at_the_models_context(tokenizer, long_goal_state, monkeypatch):
    monkeypatch.setattr(lib.prompts, "_warned_of_long_goals", True)
    _, state = long_goal_state
    config = PromptConfig(format="plain")
    observation = clean_observation(state.observation, state.objective)
    needed = fixed_part(tokenizer, state.objective, state.inventory, config)
    short = copy.deepcopy(tokenizer)
    short.model_max_length = needed + ANSWER_TOKENS + 10  # room for 10 tokens of observation
    prompt = build_prompt(state.objective, observation, state.inventory, state.admissible_commands, [], config, short)
    assert needed < length(tokenizer, prompt) <= needed + 10
    short.model_max_length = needed + ANSWER_TOKENS - 1  # not even the goal fits
    with pytest.raises(ValueError, match=f"needs {needed} tokens .* over the model's context"):
        build_prompt(state.objective, observation, state.inventory, state.admissible_commands, [], config, short)


def test_the_context_comes_from_the_model_else_a_fallback(tokenizer, tiny_model_path):
    unknown = copy.deepcopy(tokenizer)
    assert unknown.model_max_length > 10**20  # transformers' placeholder: the packaged tokenizer knows no context
    assert context_tokens(unknown) == FALLBACK_CONTEXT_TOKENS
    model = load_model(tiny_model_path)
    model.config.max_position_embeddings = 1024  # not the fallback's 2048
    fit_tokenizer_to_model(unknown, model)
    assert context_tokens(unknown) == 1024
    unknown.model_max_length = 512  # a tokenizer that knows a shorter context keeps it
    fit_tokenizer_to_model(unknown, model)
    assert context_tokens(unknown) == 512


def test_the_budget_check_still_refuses_a_budget_below_the_instruction(tokenizer):
    from lib.prompts import check_prompt_budget

    needed = instruction_tokens(PromptConfig(format="chat"), tokenizer)
    with pytest.raises(ValueError, match="cannot hold the instruction"):
        check_prompt_budget(PromptConfig(format="chat", max_prompt_tokens=needed - 1), tokenizer)


def test_play_model_agent_plays_a_game_whose_goal_is_over_the_budget(tiny_model_path, long_goal_state, tmp_path,
                                                                    monkeypatch, capsys):
    """Through play.py with the default --max_prompt_tokens: every turn is played (the first used to stop the run)."""
    monkeypatch.setattr(lib.prompts, "_warned_of_long_goals", False)
    game, state = long_goal_state
    out = tmp_path / "play"
    code = play.main(["--agent", "model", "--model_name_or_path", tiny_model_path, "--games", game, "--num_episodes",
                      "1", "--max_episode_turns", "3", "--max_new_tokens", "4", "--output_dir", str(out)])
    assert code == 0
    assert json.loads((out / "report.json").read_text())["episodes"] == 1
    transcripts = load_from_disk(str(out / "transcripts"))
    assert transcripts["turn"] == [1, 2, 3] and all(state.objective in prompt for prompt in transcripts["prompt"])
    assert capsys.readouterr().err.count("warning: a game's goal") == 1


def test_mark_tried_names_the_commands_played_from_the_same_observation(tokenizer):
    """From the whole episode, not only the turns the memory shows; other observations' commands are not named."""
    room, hallway = "You are in a kitchen. Exits lead east and west.", "You are in a hallway."
    episode = [Turn(room, "go east"), Turn(hallway, "go west"), Turn(room, "go west"), Turn(hallway, "take key"),
               Turn(room, "go east")]
    config = PromptConfig(format="plain", memory_turns=1, max_prompt_tokens=2048, mark_tried=True)
    prompt = build_prompt(OBJECTIVE, room, "", ADMISSIBLE, episode, config, tokenizer)
    assert "Already tried here: go east, go west\n" in prompt
    assert "take key" not in prompt.split("Already tried here:")[1]
    assert "Already tried" not in build_prompt(OBJECTIVE, "A cellar.", "", ADMISSIBLE, episode, config, tokenizer)
    unmarked = PromptConfig(format="plain", memory_turns=1, max_prompt_tokens=2048)
    assert "Already tried" not in build_prompt(OBJECTIVE, room, "", ADMISSIBLE, episode, unmarked, tokenizer)
    # Under a budget that leaves room for neither memory nor hint, both go and what was tried stays.
    bare = PromptConfig(format="plain", memory_turns=0, hint=False, num_examples=0, max_prompt_tokens=2048,
                        mark_tried=True)
    tight = PromptConfig(format="plain", memory_turns=1, num_examples=0, mark_tried=True,
                         max_prompt_tokens=length(tokenizer, build_prompt(OBJECTIVE, room, "", ADMISSIBLE, episode, bare,
                                                                          tokenizer)) + 2)
    cut = build_prompt(OBJECTIVE, room, "", ADMISSIBLE, episode, tight, tokenizer)
    assert "Already tried here: go east, go west\n" in cut and "take key" not in cut and "Possible" not in cut


def test_play_with_mark_tried_shows_each_turn_the_commands_its_episode_tried_there(tiny_model_path, tiny_games,
                                                                                   tmp_path):
    out = tmp_path / "play"
    code = play.main(["--agent", "model", "--model_name_or_path", tiny_model_path, "--games", tiny_games[0],
                      "--num_episodes", "2", "--max_episode_turns", "8", "--mark_tried", "--output_dir", str(out)])
    assert code == 0
    rows = load_from_disk(str(out / "transcripts")).to_list()
    # The observation a turn was played from: the one its episode's previous turn got, cleaned (the first turn's, the
    # game's opening text, is like no later one).
    played_from = {(row["episode"], row["turn"] + 1): clean_observation(row["observation"]) for row in rows}
    marked = 0
    for row in rows:
        here = played_from.get((row["episode"], row["turn"]))
        earlier = [r for r in rows if r["episode"] == row["episode"] and r["turn"] < row["turn"]]
        expected = list(dict.fromkeys(r["command"] for r in earlier
                                      if here is not None and played_from.get((r["episode"], r["turn"])) == here))
        assert ("Already tried here: " + ", ".join(expected) + "\n" in row["prompt"]) == bool(expected)
        marked += bool(expected)
    assert marked  # the tiny model goes back to where it was
