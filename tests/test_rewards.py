import pytest

from lib.env import GameState, StepResult
from lib.prompts import Turn
from lib.rewards import (
    REWARD_NAMES,
    RewardConfig,
    TurnOutcome,
    compute_reward,
    parse_reward_names,
    reward_chain,
    state_unchanged,
)


def state(observation="You are in a room.", score=0, won=False, lost=False, inventory="", steps=1):
    return GameState(
        game="g.z8", episode=0, observation=observation, score=score, max_score=3, moves=steps, won=won, lost=lost,
        admissible_commands=["take coin", "go east"], objective="Find the coin.", inventory=inventory,
        walkthrough=None, steps=steps,
    )


def step(command="take coin", reward=0.0, after=None, invalid=False, crashed=False, terminated=False):
    after = after or state()
    return StepResult(command, reward, terminated, False, after, after, crashed=crashed, invalid=invalid)


ALL = RewardConfig(REWARD_NAMES, score_weight=2.0, win_bonus=5.0, lose_penalty=3.0, living_cost=0.5,
                   invalid_penalty=0.25, letter_e_weight=0.1)


def test_every_component_and_the_total():
    won = state("You take the coin. You win!", score=1, won=True, inventory="a coin")
    parts = compute_reward(step("take the coin", 1.0, won, terminated=True), "take the coin", ALL, before=state())
    assert parts == pytest.approx({
        "score": 2.0, "win": 5.0, "lose": 0.0, "living": -0.5, "invalid": 0.0, "revisit": 0.0, "letter_e": 0.2,
        "total": 6.7,
    })


def test_lose_penalty_and_invalid_command():
    lost = state("You fall into a pit.", lost=True)
    parts = compute_reward(step("jump", after=lost, invalid=True, terminated=True), "jump", ALL, before=state())
    assert parts["lose"] == -3.0 and parts["invalid"] == -0.25 and parts["win"] == 0.0


def test_admissible_command_that_changes_nothing_is_invalid_only_with_the_state_before():
    same = state()
    config = RewardConfig(("invalid",), invalid_penalty=1.0)
    assert compute_reward(step("go east", after=same), "go east", config, before=state())["invalid"] == -1.0
    assert compute_reward(step("go east", after=same), "go east", config)["invalid"] == 0.0
    moved = state("You are in the kitchen.")
    assert compute_reward(step("go east", after=moved), "go east", config, before=state())["invalid"] == 0.0


def test_a_changed_inventory_alone_means_the_command_did_something():
    """A command that only changes the inventory (same observation and score) is not invalid; the same command
    changing nothing at all is."""
    config = RewardConfig(("invalid",), invalid_penalty=1.0)
    before, took = state(inventory=""), state(inventory="a coin")
    assert not state_unchanged(before, took) and state_unchanged(before, state())
    assert compute_reward(step("take coin", after=took), "take coin", config, before=before)["invalid"] == 0.0
    assert compute_reward(step("take coin", after=state()), "take coin", config, before=before)["invalid"] == -1.0


def test_a_crashed_game_is_not_the_commands_fault():
    config = RewardConfig(("invalid",))
    assert compute_reward(step(after=state(), crashed=True), "take coin", config, before=state())["invalid"] == 0.0


def test_only_chosen_components_count():
    config = RewardConfig(("letter_e",), letter_e_weight=1.0)
    parts = compute_reward(step("eee", 1.0, state(won=True)), "eee e", config)
    assert parts == {"letter_e": 4.0, "total": 4.0}


def test_reward_names_are_parsed_and_checked():
    assert parse_reward_names(" score, win,,score ,invalid") == ("score", "win", "invalid")
    with pytest.raises(ValueError, match="'bonus'.*letter_e"):
        RewardConfig(("score", "bonus"))
    with pytest.raises(ValueError, match="none given"):
        RewardConfig(())


def test_revisit_penalizes_an_observation_already_seen_in_the_episode():
    """Back into the cellar (seen two turns ago, as the history's cleaned observation) costs revisit_penalty; a new
    room, or the game's header lines around a new text, do not; a crash is not the command's fault."""
    config = RewardConfig(("revisit",), revisit_penalty=0.3)
    cellar, attic, kitchen = "-= Cellar =-\nA dark cellar.", "-= Attic =-\nA dusty attic.", "-= Kitchen =-\nA kitchen."
    history = [Turn("A dark cellar.", "go up")]
    back = TurnOutcome(state(attic), "go down", step("go down", after=state(cellar)), history)
    onward = TurnOutcome(state(attic), "go east", step("go east", after=state(kitchen)), history)
    stay = TurnOutcome(state(attic), "look", step("look", after=state(attic)), history)
    crashed = TurnOutcome(state(attic), "go down", step("go down", after=state(cellar), crashed=True), history)
    assert reward_chain(config)(back) == -0.3
    assert reward_chain(config)(onward) == 0.0
    assert reward_chain(config)(stay) == -0.3  # the state before counts as seen
    assert reward_chain(config)(crashed) == 0.0
