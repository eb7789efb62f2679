"""Games: generating TextWorld games offline, caching them, TextWorldExpress and ScienceWorld games, named game sets,
checking existing files.

A game source (the `--train_games` / `--eval_games` flags) is one of:
  - a named set, e.g. `default`, `hunts-easy`, `hunts-hard`, `simple`, `cooking-1`..`cooking-4`, `cooking-levels`,
    `hard`, `twx`, `sciworld-easy` (see GAME_SETS);
    the train and eval splits of a set never share a game;
  - a generator spec `KIND[:key=value]...`, e.g. `tw-coin_collector:level=5:n=8` (n = number of games);
  - a TextWorldExpress spec `twx-GAME[:key=value]...`, e.g. `twx-coin:numLocations=5:n=16`, GAME one of
    lib.engines.EXPRESS_OPTIONS with that game's options: the train split plays seeds 0..n-1 of the engine's train
    fold, the eval split seeds EVAL_SEED_OFFSET.. of its dev fold;
  - a ScienceWorld spec `sciworld-TASK[:simplify=NAME[+NAME]...]`, e.g. `sciworld-boil:simplify=easy:n=4`: the
    train split plays the task's first n train variations, the eval split its first n dev variations (ScienceWorld's
    own folds; fewer when the task has fewer);
  - an engine spec with `eval_fold=test` (EVAL_FOLDS; default dev), e.g. `sciworld-boil:eval_fold=test`: the eval
    split plays the engine's test fold instead of its dev fold (TextWorldExpress: the same seeds in the test fold;
    ScienceWorld: the task's first n test variations), for a final evaluation on games no run was tuned on;
  - existing game files: a `.z8` / `.ulx` path, a folder of them, or a glob; several joined by commas.
Items joined by commas make one list. A training mixture weighs them: `hunts-easy@3,cooking-levels@1` plays three
episodes of hunts for one of cooking, whatever the sets' sizes (`mixture`; an item without a weight weighs 1; the
eval split lists each game once). ppo_textworld.py's --train_games also takes a curriculum, stages joined by `>`
(`stages`), e.g. `tw-coin_collector:level=1:n=16 > hunts-easy`.
TextWorldExpress and ScienceWorld games are not files but game strings (lib.engines); their specs need the engine's
package and Java, and a spec's first game is started once per process to check its options (the engine checks their
ranges).

Generated games are cached under `cache_dir/KIND/OPTIONS/seed-N.z8`, so a rerun with the same settings reuses them.
Every game a source resolves to is started once for real (see check_games_start) before anything uses it; the games
that started are remembered by their bytes' hash in `cache_dir/started-games.json`, so a rerun checks nothing again.
"""

import glob
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from lib.engines import (
    EXPRESS_OPTIONS,
    SCIENCE_SIMPLIFICATIONS,
    engine_of,
    express_game,
    missing_requirement,
    science_game,
    science_tasks,
    science_variations,
)
from lib.env import start_failures

GAME_SUFFIXES = (".z8", ".ulx")
# What TextWorld reads from a game's .json to start it: its Game.deserialize raises a bare KeyError without one.
GAME_JSON_KEYS = ("world", "grammar", "quests", "infos", "KB")
STARTED_GAMES_FILE = "started-games.json"

# Options tw-make accepts per kind: name -> (type, allowed values or (min, max) range, or None for flags).
GAME_KINDS = {
    "tw-simple": {"rewards": (str, ("dense", "balanced", "sparse")), "goal": (str, ("detailed", "brief", "none"))},
    "tw-coin_collector": {"level": (int, (1, 300))},
    "tw-treasure_hunter": {"level": (int, (1, 30))},
    "tw-cooking": {
        "recipe": (int, (1, 5)),
        "take": (int, (0, 5)),
        "go": (int, (1, 6, 9, 12)),
        "open": (bool, None),
        "cook": (bool, None),
        "cut": (bool, None),
        "drop": (bool, None),
        "recipe_seed": (int, (0, 2**31 - 1)),
        "split": (str, ("train", "valid", "test")),
    },
}
EXPRESS_KIND, SCIENCE_KIND = "twx-", "sciworld-"  # a spec's kind: twx-GAME, sciworld-TASK
ENGINE_NAMES = {"twx": "TextWorldExpress", "sciworld": "ScienceWorld"}
KINDS_HELP = (f"{', '.join(GAME_KINDS)}, twx-GAME (GAME: {', '.join(EXPRESS_OPTIONS)}) or sciworld-TASK "
              "(a ScienceWorld task, e.g. sciworld-boil)")
# tw-simple needs both options; the others have tw-make defaults.
REQUIRED_DEFAULTS = {"tw-simple": {"rewards": "dense", "goal": "detailed"}}

# Eval seeds start far above any train seed so the two splits never share a generated game.
EVAL_SEED_OFFSET = 1_000_000
# The engines' held-out folds, which an engine spec's eval split plays (`eval_fold=`, the first one by default).
EVAL_FOLDS = ("dev", "test")


class GameError(ValueError):
    """A game source that cannot be used; the message names it and says how to fix it."""


@dataclass(frozen=True)
class GameSpec:
    """One family of games: a tw-make kind (or an engine's twx-GAME, sciworld-TASK), its options, how many games per
    split, and the engine fold that an engine spec's eval split plays."""

    kind: str
    options: dict = field(default_factory=dict, hash=False)
    num_train: int = 16
    num_eval: int = 8
    eval_fold: str = EVAL_FOLDS[0]

    def seeds(self, split: str) -> list[int]:
        if split == "train":
            return list(range(self.num_train))
        return [EVAL_SEED_OFFSET + i for i in range(self.num_eval)]


# tw-cooking options of the cooking levels (the named sets cooking-1 ... cooking-4).
COOKING_LEVELS = {
    1: {"recipe": 1, "take": 1, "go": 1},
    2: {"recipe": 1, "take": 1, "go": 6, "open": True},
    3: {"recipe": 2, "take": 2, "go": 1, "cut": True},
    4: {"recipe": 3, "take": 3, "go": 9, "open": True, "cook": True, "cut": True},
}
# A mixture's weight: `SOURCE@WEIGHT` in a comma-joined source; a curriculum's stages: `SOURCE > SOURCE > ...`.
WEIGHT_MARK, STAGE_MARK = "@", ">"

# Named sets. `default` trains in minutes on a laptop CPU: one-room-to-few-rooms fetch quests.
GAME_SETS = {
    "default": [
        GameSpec("tw-coin_collector", {"level": 5}, num_train=12, num_eval=6),
        GameSpec("tw-treasure_hunter", {"level": 1}, num_train=12, num_eval=6),
    ],
    "tiny": [GameSpec("tw-coin_collector", {"level": 1}, num_train=2, num_eval=2)],
    "coin": [GameSpec("tw-coin_collector", {"level": 10}, num_train=32, num_eval=16)],
    "treasure": [GameSpec("tw-treasure_hunter", {"level": 5}, num_train=32, num_eval=16)],
    "cooking": [GameSpec("tw-cooking", {"recipe": 1, "take": 1, "go": 1}, num_train=32, num_eval=16)],
    # Longer quests (README "Results"): level-10 treasure hunts and first-level cooking games (one ingredient in up to
    # six rooms behind doors, to be cut).
    "hard": [
        GameSpec("tw-treasure_hunter", {"level": 10}, num_train=16, num_eval=8),
        GameSpec("tw-cooking", {"recipe": 1, "take": 1, "go": 6, "open": True, "cut": True}, num_train=16, num_eval=8),
    ],
    # Every TextWorldExpress game, small: a few rooms without doors, short recipes and sequences.
    # Per-kind sets of the learning recipes (README "Results"), every level in the train and the eval split:
    # coin and treasure hunts at levels 1-5 and 10-20, dense tw-simple games, and cooking games at four levels in the
    # spirit of First TextWorld Problems (1: one ingredient in one room; 2: six rooms behind doors; 3: two
    # ingredients, one to cut; 4: three ingredients to cut and cook, nine rooms behind doors).
    "hunts-easy": [GameSpec(kind, {"level": level}, num_train=8, num_eval=4)
                   for kind in ("tw-coin_collector", "tw-treasure_hunter") for level in range(1, 6)],
    "hunts-hard": [GameSpec(kind, {"level": level}, num_train=8, num_eval=4)
                   for kind in ("tw-coin_collector", "tw-treasure_hunter") for level in (10, 15, 20)],
    "simple": [GameSpec("tw-simple", {"rewards": "dense", "goal": "detailed"}, num_train=32, num_eval=16)],
    **{f"cooking-{level}": [GameSpec("tw-cooking", options, num_train=16, num_eval=8)]
       for level, options in COOKING_LEVELS.items()},
    "cooking-levels": [GameSpec("tw-cooking", options, num_train=8, num_eval=4) for options in COOKING_LEVELS.values()],
    "twx": [
        GameSpec("twx-coin", {"numLocations": 5, "includeDoors": 0}, num_train=8, num_eval=4),
        GameSpec("twx-cookingworld", {"numLocations": 1, "numIngredients": 2, "numDistractorItems": 2,
                                      "includeDoors": 0, "limitInventorySize": 0}, num_train=8, num_eval=4),
        GameSpec("twx-twc", {"numLocations": 1, "numItemsToPutAway": 2, "includeDoors": 0}, num_train=8, num_eval=4),
        GameSpec("twx-mapreader", {"numLocations": 5, "maxDistanceApart": 3, "includeDoors": 0}, num_train=8,
                 num_eval=4),
        GameSpec("twx-arithmetic", {}, num_train=8, num_eval=4),
        GameSpec("twx-sorting", {}, num_train=8, num_eval=4),
        GameSpec("twx-simonsays", {"gameLength": 3}, num_train=8, num_eval=4),
        GameSpec("twx-peckingorder", {}, num_train=8, num_eval=4),
    ],
    # ScienceWorld's shortest tasks (gold paths of ~10 commands), with the `easy` simplifications (teleporting,
    # open doors, no electrical actions).
    "sciworld-easy": [
        GameSpec(f"sciworld-{task}", {"simplify": "easy"}, num_train=8, num_eval=4)
        for task in ("find-living-thing", "find-non-living-thing", "find-plant", "find-animal")
    ],
}


def default_cache_dir() -> Path:
    """Where generated games live: $TEXTWORLD_RL_GAMES, else ./games (ignored by git)."""
    return Path(os.environ.get("TEXTWORLD_RL_GAMES", "games"))


def parse_spec(text: str) -> GameSpec:
    """`KIND[:key=value]...` -> GameSpec; `n=` sets the number of games of each split."""
    kind, *parts = text.split(":")
    if kind.startswith((EXPRESS_KIND, SCIENCE_KIND)):
        return _parse_engine_spec(text, kind, parts)
    if kind not in GAME_KINDS:
        raise GameError(
            f"unknown game kind {kind!r} in {text!r}; known kinds: {KINDS_HELP} "
            f"(or a named set: {', '.join(GAME_SETS)}, or game files)"
        )
    options, num = dict(REQUIRED_DEFAULTS.get(kind, {})), None
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key == "n" and sep:
            num = _parse_int(value, text, "n", (1, 100_000))
            continue
        if key not in GAME_KINDS[kind]:
            raise GameError(f"unknown option {key!r} for {kind} in {text!r}; options: n, {', '.join(GAME_KINDS[kind])}")
        kind_type, allowed = GAME_KINDS[kind][key]
        if kind_type is bool:
            options[key] = value.strip().lower() not in ("0", "false", "no") if sep else True
        elif kind_type is int:
            options[key] = _parse_int(value, text, key, allowed)
        else:
            options[key] = _parse_choice(value, text, key, allowed)
    if num is None:
        return GameSpec(kind, options)
    return GameSpec(kind, options, num_train=num, num_eval=num)


def _parse_engine_spec(text: str, kind: str, parts: list[str]) -> GameSpec:
    """`twx-GAME[:key=value]...` or `sciworld-TASK[:simplify=...]`, with `n=` and `eval_fold=`, -> GameSpec."""
    engine = "twx" if kind.startswith(EXPRESS_KIND) else "sciworld"
    _check_requirement(text, engine)
    name = kind.removeprefix(EXPRESS_KIND if engine == "twx" else SCIENCE_KIND)
    known = list(EXPRESS_OPTIONS) if engine == "twx" else science_tasks()
    if name not in known:
        raise GameError(f"unknown {ENGINE_NAMES[engine]} {'game' if engine == 'twx' else 'task'} {name!r} in "
                        f"{text!r}; known: {', '.join(known)}")
    allowed = EXPRESS_OPTIONS[name] if engine == "twx" else ("simplify",)
    options, num, eval_fold = {}, None, EVAL_FOLDS[0]
    for part in parts:
        key, _, value = part.partition("=")
        if key == "n":
            num = _parse_int(value, text, "n", (1, 100_000))
        elif key == "eval_fold":
            eval_fold = _parse_choice(value, text, key, EVAL_FOLDS)
        elif key not in allowed:
            raise GameError(f"unknown option {key!r} for {kind} in {text!r}; options: "
                            f"{', '.join(('n', *allowed, 'eval_fold'))}")
        elif engine == "twx":
            options[key] = _parse_int(value, text, key, (0, 100_000))
        else:
            unknown = [simplification for simplification in value.split("+")
                       if simplification not in SCIENCE_SIMPLIFICATIONS]
            if unknown:
                raise GameError(f"unknown simplification {unknown[0]!r} in {text!r}; known: "
                                f"{', '.join(SCIENCE_SIMPLIFICATIONS)} (join several with +)")
            options[key] = value
    if num is None:
        return GameSpec(kind, options, eval_fold=eval_fold)
    return GameSpec(kind, options, num_train=num, num_eval=num, eval_fold=eval_fold)


def _check_requirement(text: str, engine: str) -> None:
    """GameError unless `engine`'s package and Java are installed, naming what to install."""
    missing = missing_requirement(engine)
    if missing is not None:
        raise GameError(f"{text!r} is a {ENGINE_NAMES[engine]} game, which needs {missing}")


def is_engine_spec(spec: GameSpec) -> bool:
    """Whether `spec` names TextWorldExpress or ScienceWorld games (strings) rather than files to generate."""
    return spec.kind.startswith((EXPRESS_KIND, SCIENCE_KIND))


def engine_games(spec: GameSpec, split: str) -> list[str]:
    """The game strings (lib.engines) of a TextWorldExpress or ScienceWorld spec's split: the engine's train fold, or
    for the eval split the spec's eval_fold."""
    fold = "train" if split == "train" else spec.eval_fold
    if spec.kind.startswith(EXPRESS_KIND):
        return [express_game(spec.kind.removeprefix(EXPRESS_KIND), fold, seed, spec.options)
                for seed in spec.seeds(split)]
    task = spec.kind.removeprefix(SCIENCE_KIND)
    variations = science_variations([task])[task][fold]
    count = spec.num_train if split == "train" else spec.num_eval
    simplifications = spec.options.get("simplify", "").replace("+", ",")
    return [science_game(task, variation, simplifications) for variation in variations[:count]]


def check_engine_specs(specs: list[GameSpec]) -> None:
    """Check that each TextWorldExpress or ScienceWorld spec's engine is installed, then start its first game once per
    process (the engine checks the options' values); raises GameError naming the spec and what is wrong."""
    for spec in specs:
        _check_requirement(spec.kind, "twx" if spec.kind.startswith(EXPRESS_KIND) else "sciworld")
    firsts = {}
    for spec in specs:
        game = engine_games(spec, "train")[0]
        if game not in _started_engine_games:
            firsts[game] = spec
    failures = start_failures(list(firsts)) if firsts else {}
    _started_engine_games.update(game for game in firsts if game not in failures)
    for game, reason in failures.items():
        spec = firsts[game]
        options = "".join(f":{key}={value}" for key, value in spec.options.items())
        raise GameError(f"{spec.kind}{options} does not start in {ENGINE_NAMES[engine_of(game)]} ({reason}): change "
                        "the options")


_started_engine_games: set[str] = set()  # check_engine_specs' games that started in this process


def _parse_int(value: str, text: str, key: str, allowed) -> int:
    try:
        number = int(value)
    except ValueError:
        raise GameError(f"{key}={value!r} in {text!r} must be an integer") from None
    if len(allowed) == 2 and not allowed[0] <= number <= allowed[1]:
        raise GameError(f"{key}={number} in {text!r} is out of range [{allowed[0]}, {allowed[1]}]")
    if len(allowed) > 2 and number not in allowed:
        raise GameError(f"{key}={number} in {text!r} must be one of {allowed}")
    return number


def _parse_choice(value: str, text: str, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise GameError(f"{key}={value!r} in {text!r} is not one of {', '.join(allowed)}")
    return value


def options_slug(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"


def game_path(spec: GameSpec, seed: int, cache_dir: Path) -> Path:
    return Path(cache_dir) / spec.kind / options_slug(spec.options) / f"seed-{seed}.z8"


def tw_make_command(spec: GameSpec, seed: int, output: Path) -> list[str]:
    command = ["tw-make", spec.kind, "--seed", str(seed), "--output", str(output), "--silent", "-f"]
    for key, value in sorted(spec.options.items()):
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, str(value)]
    return command


def unplayable_marker(spec: GameSpec, seed: int, cache_dir: Path) -> Path:
    return game_path(spec, seed, cache_dir).with_suffix(".unplayable")


def generate_game(spec: GameSpec, seed: int, cache_dir: Path) -> Path | None:
    """Generate one game with tw-make into the cache (atomically: a crash never leaves half a game). None when
    TextWorld cannot build a quest of these options for this seed (remembered in the cache as a .unplayable file)."""
    target = game_path(spec, seed, cache_dir)
    if target.exists() and target.with_suffix(".json").exists():
        return target
    if unplayable_marker(spec, seed, cache_dir).exists():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    tw_make = shutil.which("tw-make") or str(Path(sys.executable).parent / "tw-make")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        output = Path(tmp) / target.name
        command = tw_make_command(spec, seed, output)
        command[0] = tw_make
        # tw-cooking draws from Python's hash order; a fixed hash seed makes every game byte-identical.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if "QuestGenerationError" in result.stderr:
            unplayable_marker(spec, seed, cache_dir).write_text(result.stderr[-2000:])
            return None
        if result.returncode != 0 or not output.exists():
            raise GameError(f"tw-make failed for {spec.kind} {spec.options} seed {seed}:\n{result.stderr[-2000:]}")
        os.replace(output.with_suffix(".json"), target.with_suffix(".json"))
        os.replace(output, target)
    return target


def generate_games(specs: list[GameSpec], split: str, cache_dir: Path, progress: bool = True) -> list[Path]:
    """All games of `specs` for one split, generating the missing ones in parallel with a progress bar.

    A seed for which TextWorld cannot build the quest (some map/quest-length combinations of a level) is replaced by
    the next seeds after the split's range, in order, so every run gets the same games and the split keeps its size.
    """
    games = []
    for spec in specs:
        seeds = spec.seeds(split)
        first, wanted, next_seed = seeds[0], len(seeds), seeds[-1] + 1
        while seeds:
            _generate_missing(spec, seeds, split, cache_dir, progress)
            playable = [seed for seed in seeds if not unplayable_marker(spec, seed, cache_dir).exists()]
            games += [game_path(spec, seed, cache_dir) for seed in playable]
            missing = len(seeds) - len(playable)
            if missing and next_seed + missing - first > 10 * wanted:
                raise GameError(f"{spec.kind} {spec.options}: TextWorld cannot build most quests of these options; "
                                "pick a lower level or fewer rooms")
            seeds = list(range(next_seed, next_seed + missing))
            next_seed += missing
    return games


def _generate_missing(spec: GameSpec, seeds: list[int], split: str, cache_dir: Path, progress: bool) -> None:
    missing = [seed for seed in seeds if not game_path(spec, seed, cache_dir).exists()
               and not unplayable_marker(spec, seed, cache_dir).exists()]
    if missing:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            futures = [pool.submit(generate_game, spec, seed, cache_dir) for seed in missing]
            for future in tqdm(futures, desc=f"generating {split} games", disable=not progress):
                future.result()


def check_game_file(path: Path) -> Path:
    """Raise GameError unless `path` is a complete TextWorld game with its .json sidecar."""
    path = Path(path)
    if not path.exists():
        raise GameError(f"game file not found: {path}")
    if not path.is_file():
        raise GameError(f"not a file: {path}")
    if path.suffix not in GAME_SUFFIXES:
        raise GameError(f"{path} is not a game file: expected a TextWorld game ending in {' or '.join(GAME_SUFFIXES)}")
    data = path.read_bytes()
    if path.suffix == ".z8":
        # Z-machine header: byte 0 is the version, bytes 0x1A-0x1B the file length / 8 for version 8.
        if len(data) < 64 or data[0] != 8:
            raise GameError(f"{path} is not a Z-machine version 8 story file (corrupt or wrong format); regenerate it or pass another file")
        declared = struct.unpack(">H", data[0x1A:0x1C])[0] * 8
    else:
        # Glulx header: magic 'Glul', then version, RAMSTART, EXTSTART (the file length).
        if len(data) < 36 or data[:4] != b"Glul":
            raise GameError(f"{path} is not a Glulx story file (corrupt or wrong format)")
        declared = struct.unpack(">I", data[12:16])[0]
    if declared and len(data) < declared:
        raise GameError(f"{path} is corrupt: truncated to {len(data)} of {declared} bytes; regenerate or re-download it")
    check_game_json(path)
    return path


def check_game_json(path: Path) -> None:
    """Raise GameError unless the game's .json sidecar is a JSON object with what TextWorld reads (GAME_JSON_KEYS)."""
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        raise GameError(
            f"{path} has no {sidecar.name} beside it: TextWorld needs the game's .json "
            "(written by tw-make) for admissible commands and scores"
        )
    fix = "regenerate the game (tw-make writes both files) or restore the file"
    text = sidecar.read_bytes()
    if not text.strip():
        raise GameError(f"{sidecar} is empty; {fix}")
    try:
        data = json.loads(text)
    except ValueError as error:  # UnicodeDecodeError is one too
        raise GameError(f"{sidecar} is not valid JSON ({error}); {fix}") from None
    if not isinstance(data, dict):
        raise GameError(f"{sidecar} holds a JSON {type(data).__name__}, not a TextWorld game's object; {fix}")
    missing = [key for key in GAME_JSON_KEYS if key not in data]
    if missing:
        raise GameError(
            f"{sidecar} lacks {', '.join(map(repr, missing))}, which TextWorld needs to start the game; {fix}"
        )


def game_hash(path: str | Path) -> str:
    """sha256 of a game's story file and its .json: the same hash, the same game."""
    digest = hashlib.sha256(Path(path).read_bytes())
    digest.update(Path(path).with_suffix(".json").read_bytes())
    return digest.hexdigest()


def check_games_start(games: list[str], cache_dir: Path) -> None:
    """Start every distinct game once (lib.env.start_failures: a reset and a `look`), unless a game with the same
    bytes has started before; raises GameError naming the first that fails, with the reason in one line.

    Header and .json checks cannot see a story file damaged inside, or a .json TextWorld reads differently: only
    starting the game does, and it costs a second per game on a fresh process. The games that started are
    remembered by hash in cache_dir/STARTED_GAMES_FILE, so checking them again costs only the hashing.
    """
    record = Path(cache_dir) / STARTED_GAMES_FILE
    started = _read_started_games(record)
    by_hash = {game_hash(game): str(game) for game in games}  # distinct games: one path each
    unchecked = {digest: game for digest, game in by_hash.items() if digest not in started}
    if not unchecked:
        return
    failures = start_failures(list(unchecked.values()))
    started.update({digest: game for digest, game in unchecked.items() if game not in failures})
    _write_started_games(record, started)
    if failures:
        game, reason = next(iter(failures.items()))
        others = f" (and {len(failures) - 1} more games fail)" if len(failures) > 1 else ""
        raise GameError(f"{game} does not start in TextWorld ({reason}){others}: regenerate it or pass another file")


def _read_started_games(record: Path) -> dict[str, str]:
    """{hash: path} of the games that started; a missing or unreadable record is an empty one (it is only a cache)."""
    try:
        started = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return started if isinstance(started, dict) else {}


def _write_started_games(record: Path, started: dict[str, str]) -> None:
    """Written beside the target and renamed: processes checking at the same time never read half a file. The record
    only saves time: a cache that cannot take it (read-only, under a file: the path checks name those) goes without."""
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        staging = record.with_name(f".{record.name}.{os.getpid()}")
        staging.write_text(json.dumps(started))
        os.replace(staging, record)
    except OSError:
        pass


def find_game_files(source: str) -> list[Path]:
    """Existing game files from a path, a folder (searched recursively) or a glob."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in GAME_SUFFIXES)
        if not files:
            raise GameError(f"folder {path} holds no game files ({', '.join(GAME_SUFFIXES)}); add games to it or pass another folder")
    elif glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix in GAME_SUFFIXES)
        if not files:
            raise GameError(f"glob {source!r} matches no game files ({', '.join(GAME_SUFFIXES)})")
    else:
        files = [path]
    return [check_game_file(p) for p in files]


def looks_like_path(source: str) -> bool:
    return os.sep in source or source.endswith(GAME_SUFFIXES) or glob.has_magic(source) or Path(source).exists()


def _items(source: str) -> list[str]:
    """The comma-joined items of one source, without their weights."""
    return [item for item, _ in _weighted_items(source)]


def _weighted_items(source: str) -> list[tuple[str, float | None]]:
    """(item, weight or None) of each comma-joined item of one source (`ITEM@WEIGHT`, module docstring)."""
    if STAGE_MARK in (source or ""):
        raise GameError(f"{source!r} has curriculum stages ({STAGE_MARK!r}): only ppo_textworld.py's --train_games "
                        "takes them; give one stage here")
    items = []
    for part in (source or "").split(","):
        item, mark, weight = part.strip().rpartition(WEIGHT_MARK)
        if not mark or looks_like_path(part.strip()):
            items.append((part.strip(), None))
            continue
        try:
            number = float(weight)
        except ValueError:
            number = math.nan
        if not number > 0 or math.isinf(number) or not item.strip():
            raise GameError(f"bad mixture weight in {part.strip()!r}: write SOURCE{WEIGHT_MARK}WEIGHT with a positive "
                            f"number, e.g. hunts-easy{WEIGHT_MARK}3,cooking-levels{WEIGHT_MARK}1")
        items.append((item.strip(), number))
    items = [(item, weight) for item, weight in items if item]
    if not items:
        raise GameError("empty game source: give a named set (e.g. 'default'), a generator spec, or game files")
    return items


def stages(source: str) -> list[str]:
    """A curriculum's stages, each one game source: `A > B > C` -> [A, B, C]; a source without stages is one."""
    parts = [part.strip() for part in (source or "").split(STAGE_MARK)]
    if len(parts) > 1 and not all(parts):
        raise GameError(f"empty curriculum stage in {source!r}: write STAGE {STAGE_MARK} STAGE {STAGE_MARK} ..., each "
                        "stage a game source")
    return parts


def mixture(parts: list[tuple[list[str], float]]) -> list[str]:
    """Games of weighted parts as one training list: part i's games repeated in turn so that it fills weight_i / the
    sum of the weights of the list (to within one game), each of its games equally often (to within one) and at
    least once. The env plays the list in a reshuffled order every pass, so episodes follow the weights."""
    total = sum(weight for _, weight in parts)
    size = max(math.ceil(len(games) * total / weight) for games, weight in parts)
    games_list = []
    for games, weight in parts:
        count = max(len(games), round(size * weight / total))
        games_list += [games[index % len(games)] for index in range(count)]
    return games_list


def _kind_of(item: str) -> str:
    """Which kind of game source one item is: 'set', 'spec' or 'files'."""
    if item in GAME_SETS:
        return "set"
    kind = item.split(":")[0]
    if kind in GAME_KINDS or kind.startswith((EXPRESS_KIND, SCIENCE_KIND)):
        return "spec"
    if looks_like_path(item):
        return "files"
    if item.startswith("tw-"):
        parse_spec(item)  # raises: an unknown kind, named with the known ones
    raise GameError(
        f"unknown game source {item!r}: not a named set ({', '.join(GAME_SETS)}), not a generator spec "
        f"(KIND[:key=value], kinds: {KINDS_HELP}), and no such file or folder"
    )


def _specs(item: str, kind: str) -> list[GameSpec]:
    """The specs of a named set or spec item; none for files."""
    return GAME_SETS[item] if kind == "set" else [parse_spec(item)] if kind == "spec" else []


def resolve_games(source: str, split: str, cache_dir: Path | None = None, progress: bool = True) -> list[str]:
    """Turn a game source (see module docstring) into a list of games, in the source's order: checked game files,
    generated as needed, and TextWorldExpress / ScienceWorld game strings; every game file has started once
    (check_games_start), and every engine spec's first game (check_engine_specs)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weighted = _weighted_items(source)
    items = [(item, _kind_of(item)) for item, _ in weighted]
    # The engines first: a missing Java or a bad option is said before any game is generated.
    check_engine_specs([spec for item, kind in items for spec in _specs(item, kind) if is_engine_spec(spec)])
    parts: list[list[str]] = []
    files: list[Path] = []
    for item, kind in items:
        games: list[str] = []
        if kind == "files":
            found = find_game_files(item)
            files += found
            games += [str(p) for p in found]
        for spec in _specs(item, kind):
            if is_engine_spec(spec):
                games += engine_games(spec, split)
            else:
                found = generate_games([spec], split, cache_dir, progress)
                files += found
                games += [str(p) for p in found]
        parts.append(games)
    check_games_start(files, cache_dir)
    if split == "train" and any(weight is not None for _, weight in weighted):  # held-out games count once each
        return mixture([(games, 1.0 if weight is None else weight) for games, (_, weight) in zip(parts, weighted)])
    return [game for games in parts for game in games]


def would_generate(source: str, split: str, cache_dir: Path) -> bool:
    """Whether resolve_games(source, split, cache_dir) would generate a game: some seed of a named set or generator
    spec has neither its game nor its unplayable marker in the cache (engine specs generate nothing)."""
    for item in _items(source):
        for spec in _specs(item, _kind_of(item)):
            if is_engine_spec(spec):
                continue
            for seed in spec.seeds(split):
                if not game_path(spec, seed, cache_dir).exists() and not unplayable_marker(spec, seed, cache_dir).exists():
                    return True
    return False


def check_game_source(source: str, cache_dir: Path | None = None) -> None:
    """Validate a game source without generating anything, so bad flags fail before any model is loaded: existing
    game files are started once for real (check_games_start, remembered in `cache_dir`), and so is the first game of
    each TextWorldExpress or ScienceWorld spec (check_engine_specs)."""
    files, engine_specs = [], []
    for item in _items(source):
        kind = _kind_of(item)
        if kind == "files":
            files += find_game_files(item)
        engine_specs += [spec for spec in _specs(item, kind) if is_engine_spec(spec)]
    if files:
        check_games_start(files, Path(cache_dir) if cache_dir else default_cache_dir())
    check_engine_specs(engine_specs)


def game_name(path: str) -> str:
    """A short readable name for reports: KIND/OPTIONS/seed-N for generated games, the game string of the other
    engines' games, else the file stem."""
    if engine_of(path) != "textworld":
        return path
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] in GAME_KINDS:
        return "/".join(parts[-3:]).removesuffix(".z8")
    return Path(path).stem
