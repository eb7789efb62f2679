import shutil
from pathlib import Path

import pytest

from lib import games as games_module
from lib.games import (
    EVAL_SEED_OFFSET,
    GAME_SETS,
    GameError,
    check_game_source,
    game_name,
    game_path,
    parse_spec,
    resolve_games,
    tw_make_command,
)

TINY_SPEC = "tw-coin_collector:level=1:n=1"


def test_generation_is_deterministic_and_cached(tmp_path, monkeypatch):
    first = resolve_games(TINY_SPEC, "train", tmp_path / "a", progress=False)
    second = resolve_games(TINY_SPEC, "train", tmp_path / "b", progress=False)
    assert len(first) == len(second) == 1
    for a, b in zip(first, second):
        assert Path(a).read_bytes() == Path(b).read_bytes()
        assert Path(a).with_suffix(".json").read_bytes() == Path(b).with_suffix(".json").read_bytes()

    def no_tw_make(*args, **kwargs):
        raise AssertionError("tw-make ran although the game is cached")

    mtime = Path(first[0]).stat().st_mtime_ns
    monkeypatch.setattr(games_module.subprocess, "run", no_tw_make)
    assert resolve_games(TINY_SPEC, "train", tmp_path / "a", progress=False) == first
    assert Path(first[0]).stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="tw-make ran"):
        resolve_games(TINY_SPEC, "eval", tmp_path / "a", progress=False)


@pytest.mark.parametrize("name", list(GAME_SETS))
def test_named_set_splits_are_disjoint(name, tmp_path):
    specs = GAME_SETS[name]
    train = {game_path(spec, seed, tmp_path) for spec in specs for seed in spec.seeds("train")}
    evaluation = {game_path(spec, seed, tmp_path) for spec in specs for seed in spec.seeds("eval")}
    assert len(train) == sum(spec.num_train for spec in specs)
    assert len(evaluation) == sum(spec.num_eval for spec in specs)
    assert not train & evaluation
    assert all(seed >= EVAL_SEED_OFFSET for spec in specs for seed in spec.seeds("eval"))


def test_parse_spec_options_and_counts():
    spec = parse_spec("tw-coin_collector:level=5:n=3")
    assert (spec.kind, spec.options, spec.num_train, spec.num_eval) == ("tw-coin_collector", {"level": 5}, 3, 3)
    cooking = parse_spec("tw-cooking:recipe=2:go=6:open:cut=false:split=valid")
    assert cooking.options == {"recipe": 2, "go": 6, "open": True, "cut": False, "split": "valid"}
    assert tw_make_command(cooking, 7, Path("out.z8"))[1:] == [
        "tw-cooking", "--seed", "7", "--output", "out.z8", "--silent", "-f",
        "--go", "6", "--open", "--recipe", "2", "--split", "valid",
    ]
    # tw-simple needs both options; the defaults fill them in.
    assert parse_spec("tw-simple:rewards=sparse").options == {"rewards": "sparse", "goal": "detailed"}
    assert parse_spec("tw-treasure_hunter:level=30").options == {"level": 30}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tw-nonsense:level=1", "unknown game kind 'tw-nonsense'"),
        ("tw-coin_collector:size=3", "unknown option 'size'"),
        ("tw-coin_collector:level=0", r"out of range \[1, 300\]"),
        ("tw-treasure_hunter:level=31", r"out of range \[1, 30\]"),
        ("tw-coin_collector:level=two", "must be an integer"),
        ("tw-cooking:go=5", "must be one of"),
        ("tw-simple:rewards=lots", "is not one of"),
        ("tw-coin_collector:n=0", "out of range"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(GameError, match=message):
        check_game_source(spec)


@pytest.fixture
def real_game(tiny_games, tmp_path) -> Path:
    """A copy of a real game (with its .json) that a test may damage."""
    source = Path(tiny_games[0])
    target = tmp_path / "copy" / source.name
    target.parent.mkdir()
    shutil.copy(source, target)
    shutil.copy(source.with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_existing_game_files_folders_and_globs(real_game, tiny_games):
    assert check_game_source(str(real_game)) is None
    assert resolve_games(str(real_game.parent), "eval", progress=False) == [str(real_game)]
    assert resolve_games(f"{real_game.parent}/*.z8,{tiny_games[1]}", "train", progress=False) == [
        str(real_game), tiny_games[1]
    ]
    assert game_name(tiny_games[0]) == "tw-coin_collector/level=1/seed-0"
    assert game_name(str(real_game)) == "seed-0"


def test_bad_game_files(real_game, tmp_path):
    with pytest.raises(GameError, match="game file not found"):
        check_game_source(str(tmp_path / "missing.z8"))

    text = tmp_path / "notes.txt"
    text.write_text("not a game")
    with pytest.raises(GameError, match="is not a game file"):
        check_game_source(str(text))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GameError, match="holds no game files"):
        check_game_source(str(empty))

    with pytest.raises(GameError, match="matches no game files"):
        check_game_source(str(tmp_path / "nothing-*.z8"))

    real_game.with_suffix(".json").rename(tmp_path / "aside.json")
    with pytest.raises(GameError, match="has no seed-0.json beside it"):
        check_game_source(str(real_game))
    (tmp_path / "aside.json").rename(real_game.with_suffix(".json"))

    data = real_game.read_bytes()
    real_game.write_bytes(data[: len(data) // 2])
    with pytest.raises(GameError, match="corrupt: truncated"):
        check_game_source(str(real_game))
    real_game.write_bytes(b"\x05" + data[1:])
    with pytest.raises(GameError, match="not a Z-machine version 8"):
        check_game_source(str(real_game))


@pytest.mark.parametrize("source", ["nonsense", "defaults", "", " , "])
def test_unknown_sources(source):
    with pytest.raises(GameError, match="unknown game source|empty game source"):
        check_game_source(source)


def test_resolve_games_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be"):
        resolve_games("tiny", "test")


def test_a_seed_textworld_cannot_build_is_replaced_by_the_next_ones(tmp_path, monkeypatch):
    spec = games_module.GameSpec("tw-treasure_hunter", {"level": 10}, num_train=3, num_eval=1)
    unbuildable = {1, 3}
    made = []

    def fake_generate(spec_, seed, cache_dir):
        made.append(seed)
        if seed in unbuildable:
            games_module.unplayable_marker(spec_, seed, cache_dir).write_text("QuestGenerationError")
            return None
        path = games_module.game_path(spec_, seed, cache_dir)
        path.write_bytes(b"game")
        path.with_suffix(".json").write_text("{}")
        return path

    games_module.game_path(spec, 0, tmp_path).parent.mkdir(parents=True)
    monkeypatch.setattr(games_module, "generate_game", fake_generate)
    names = [path.name for path in games_module.generate_games([spec], "train", tmp_path, progress=False)]
    assert names == ["seed-0.z8", "seed-2.z8", "seed-4.z8"]  # 1 is replaced by 3, which is replaced by 4
    assert sorted(made) == [0, 1, 2, 3, 4]
    made.clear()  # the cache remembers both the games and the seeds that cannot be built
    assert [p.name for p in games_module.generate_games([spec], "train", tmp_path, progress=False)] == names
    assert made == []


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_cooking_levels_generate_and_grow(level, games_cache):
    """Each cooking level's tw-make options build a playable game; a level's recipe needs as many ingredients as the
    level says (1, 1, 2, 3) and its world the rooms (1, 6, 1, 9)."""
    import dataclasses
    import json

    from lib.games import generate_games

    spec = dataclasses.replace(GAME_SETS[f"cooking-{level}"][0], num_train=1)
    (game,) = generate_games([spec], "train", games_cache, progress=False)
    data = json.loads(Path(game).with_suffix(".json").read_text())
    rooms = [name for name, info in data["infos"] if info["type"] == "r"]
    assert len(rooms) == {1: 1, 2: 6, 3: 1, 4: 9}[level]
    assert len(data["metadata"]["ingredients"]) == {1: 1, 2: 1, 3: 2, 4: 3}[level]


def test_a_mixture_weighs_its_sources_and_the_eval_split_lists_each_game_once(tiny_games, small_games, games_cache):
    from lib.games import mixture

    coin = "tw-coin_collector:level=2:n=2"
    games = resolve_games(f"tiny@3,{coin}@1", "train", games_cache, progress=False)
    counts = {game: games.count(game) for game in games}
    assert sum(counts[game] for game in tiny_games) == 3 * sum(counts[game] for game in small_games[:2])
    assert set(games) == set(tiny_games) | set(small_games[:2])
    assert len(set(counts[game] for game in tiny_games)) == 1  # each game of a source equally often
    held_out = resolve_games(f"tiny@3,{coin}@1", "eval", games_cache, progress=False)
    assert len(held_out) == len(set(held_out)) == 4
    # Unequal sizes: the weights hold per source, not per game, and every game appears.
    parts = mixture([(["a", "b", "c", "d", "e"], 1.0), (["x"], 1.0)])
    assert sorted(set(parts)) == ["a", "b", "c", "d", "e", "x"] and parts.count("x") == 5
    assert mixture([(["a"], 2.5), (["x", "y"], 1.0)]).count("a") == 5


@pytest.mark.parametrize("source", ["tiny@0", "tiny@-1", "tiny@x", "@2", "tiny@inf"])
def test_bad_mixture_weights_are_named(source):
    with pytest.raises(GameError, match="bad mixture weight"):
        check_game_source(source)


def test_curriculum_stages():
    from lib.games import stages

    assert stages("tiny") == ["tiny"]
    assert stages("tiny > tw-coin_collector:level=2:n=2@2,coin") == ["tiny", "tw-coin_collector:level=2:n=2@2,coin"]
    with pytest.raises(GameError, match="empty curriculum stage"):
        stages("tiny > ")
    with pytest.raises(GameError, match="curriculum stages"):
        resolve_games("tiny > coin", "train")
