"""Bad files, found before the work starts: each case exits non-zero with one `error:` line naming the file or flag,
no traceback, no model loaded, and nothing that existed before changed. A game that breaks while playing is a crashed
episode, not a 0% one. A failed final push keeps the outputs and says how to push them later. Under DeepSpeed ZeRO-2
every checkpoint file loads with torch.load(weights_only=True), and a resume from them reloads the same run.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lib.training
import play
import ppo_textworld
from lib.agents import RandomAgent
from lib.env import BatchEnv
from lib.evaluation import evaluate
from lib.games import game_name
from lib.prompts import PromptConfig

ROOT = Path(__file__).resolve().parents[1]
PUSH_REPO = "someone/ppo-textworld"


def flags(**values) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def ppo_flags(model: str, games: list[str], output: Path, **overrides) -> list[str]:
    return flags(**{
        "model_name_or_path": model, "train_games": ",".join(games), "eval_games": ",".join(games),
        "output_dir": output, "num_iterations": 1, "num_envs": 2, "turns_per_slot": 2, "num_minibatches": 2,
        "gradient_accumulation_steps": 1, "max_episode_turns": 3, "eval_episodes": 2, "save_every": 1,
        "max_candidates": 3, "trainable_layers_fraction": 0.5, "learning_rate": 1e-3, "progress": False,
        "report_to": "none", "games_dir": output.parent / "games", **overrides,
    })


def damage_story_file(game: Path) -> None:
    """Zero the first 4 KB of the game's code (from the high-memory base of its Z-machine header): the header and the
    start still look right, and the first command halts the emulator."""
    data = bytearray(game.read_bytes())
    code = struct.unpack(">H", data[4:6])[0]
    data[code:code + 4096] = bytes(4096)
    game.write_bytes(bytes(data))


def copy_game(source: str, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for suffix in (".z8", ".json"):
        shutil.copy(Path(source).with_suffix(suffix), folder / f"game{suffix}")
    return folder / "game.z8"


def copy_model(source: str, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def trained_run(tiny_model_path, tiny_games, tmp_path_factory):
    """One PPO iteration with a checkpoint, run in this process with --push_to_hub and a Hub that accepts the login
    but fails the upload. Returns (output_dir, the run's exit message, what it printed)."""
    output = tmp_path_factory.mktemp("trained") / "ppo"
    printed = io.StringIO()

    def failing_push(*args, **kwargs):
        raise ConnectionError("the Hub went away")

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(lib.training, "check_push_flag", lambda repo_id: None)
        patch.setattr(lib.training, "push_model_folder", failing_push)
        with pytest.raises(SystemExit) as exit_info:
            ppo_textworld.main(ppo_flags(tiny_model_path, tiny_games, output, push_to_hub=PUSH_REPO))
    return output, str(exit_info.value.code), printed.getvalue()


# ---------------------------------------------------------------- bad files, refused before the work starts
# Each case builds its bad file under tmp and returns (script, argv, texts the error line must hold, folder whose
# files must stay as they were). `run` is the trained_run fixture's output, for the resume cases.

def corrupt_json(tmp, games, model, run):
    game = copy_game(games[0], tmp / "corrupt")
    game.with_suffix(".json").write_text('{"version": 1, "world": [')
    return "ppo", ppo_flags(model, games, tmp / "out", train_games=game), [
        "--train_games", f"{game.with_suffix('.json')} is not valid JSON"], tmp / "corrupt"


def empty_json(tmp, games, model, run):
    game = copy_game(games[0], tmp / "empty")
    game.with_suffix(".json").write_text("")
    return "play", ["--agent", "random", "--games", str(game), "--games_dir", str(tmp / "games")], [
        "--games", f"{game.with_suffix('.json')} is empty"], tmp / "empty"


def json_missing_keys(tmp, games, model, run):
    game = copy_game(games[0], tmp / "keys")
    data = json.loads(game.with_suffix(".json").read_text())
    del data["quests"]
    game.with_suffix(".json").write_text(json.dumps(data))
    return "ppo", ppo_flags(model, games, tmp / "out", eval_games=game), [
        "--eval_games", f"{game.with_suffix('.json')} lacks 'quests'"], tmp / "keys"


def json_textworld_cannot_read(tmp, games, model, run):
    game = copy_game(games[0], tmp / "unreadable")
    data = json.loads(game.with_suffix(".json").read_text())
    data["quests"] = 5
    game.with_suffix(".json").write_text(json.dumps(data))
    return "ppo", ppo_flags(model, games, tmp / "out", train_games=game), [
        "--train_games", f"{game} does not start in TextWorld (TypeError"], tmp / "unreadable"


def damaged_story_file(tmp, games, model, run):
    game = copy_game(games[0], tmp / "damaged")
    damage_story_file(game)
    return "play", ["--agent", "random", "--games", str(game), "--games_dir", str(tmp / "games")], [
        "--games", f"{game} does not start in TextWorld", "Emulator halted"], tmp / "damaged"


def truncated_weights(tmp, games, model, run):
    weights = copy_model(model, tmp / "model")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return "play", ["--agent", "model", "--model_name_or_path", str(tmp / "model"), "--games", ",".join(games)], [
        "--model_name_or_path", f"{weights} is not a complete safetensors file"], tmp / "model"


def garbage_weights(tmp, games, model, run):
    weights = copy_model(model, tmp / "model")
    weights.write_bytes(os.urandom(4096))
    return "ppo", ppo_flags(str(tmp / "model"), games, tmp / "out"), [
        "--model_name_or_path", f"{weights} is not a complete safetensors file"], tmp / "model"


def resume_with(broken: str, damage):
    """A resume case: the trained run copied, `broken` (a path under its checkpoint) damaged by `damage(path)`."""
    def case(tmp, games, model, run):
        output = tmp / "run"
        shutil.copytree(run, output)
        path = output / "checkpoints" / "checkpoint-1" / broken
        damage(path)
        argv = ppo_flags(model, games, output, num_iterations=2, resume_from_checkpoint="latest")
        return "ppo", argv, ["--resume_from_checkpoint", str(path)], output
    return case


def write(text: str):
    return lambda path: path.write_text(text)


def empty_folder(path: Path) -> None:
    shutil.rmtree(path)
    path.mkdir()


class RunsCode:
    """Unpickling it would call os.system: a checkpoint must never be loaded that way."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


RESUME_CASES = {
    "corrupt trainer_state.json": resume_with("trainer_state.json", write('{"iteration": 1,')),
    "corrupt process_state-0.json": resume_with("process_state-0.json", write("")),
    "empty training_state/": resume_with("training_state", empty_folder),
    "optimizer state that runs code": resume_with("training_state/optimizer.bin", lambda p: torch.save(RunsCode(), p)),
}
CASES = {
    "corrupt json": corrupt_json,
    "empty json": empty_json,
    "json missing keys": json_missing_keys,
    "json TextWorld cannot read": json_textworld_cannot_read,
    "damaged story file": damaged_story_file,
    "truncated model.safetensors": truncated_weights,
    "garbage model.safetensors": garbage_weights,
    **RESUME_CASES,
}


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_in_process(script: str, argv: list[str], capfd) -> tuple[int, str]:
    """(exit code, stderr with the error line last) of play.main or ppo_textworld.main, as a user would see them."""
    if script == "play":
        code = play.main(argv)
        return code, capfd.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ppo_textworld.main(argv)
    message = exit_info.value.code
    return 1 if isinstance(message, str) else message, capfd.readouterr().err + f"{message}\n"


def assert_one_error_line(code: int, stderr: str, expected: list[str]) -> None:
    assert code != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_file_is_refused_before_the_work_starts(name, tiny_games, tiny_model_path, tmp_path, capfd,
                                                      monkeypatch, request):
    run = request.getfixturevalue("trained_run")[0] if name in RESUME_CASES else None
    script, argv, expected, watched = CASES[name](tmp_path, tiny_games, tiny_model_path, run)
    before = fingerprint(watched)
    capfd.readouterr()
    for module in (lib.training, play):
        monkeypatch.setattr(module, "load_model", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    code, stderr = run_in_process(script, argv, capfd)
    assert_one_error_line(code, stderr, expected)
    assert fingerprint(watched) == before


# Without a network (as here) or a login, run as a user would run it: a fresh process, no Hub token.
HUB_CASES = {
    "made-up hub id": (["play.py", "--agent", "model", "--model_name_or_path", "someone/some-model"],
                       ["--model_name_or_path", "'someone/some-model'", "Hub is unreachable"]),
    "--push_to_hub without login": (["ppo_textworld.py", "--push_to_hub", "someone/model", "--report_to", "none"],
                                    ["--push_to_hub someone/model: not logged in", "hf auth login"]),
}


@pytest.mark.parametrize("name", list(HUB_CASES))
def test_the_hub_is_checked_within_seconds(name, tmp_path):
    argv, expected = HUB_CASES[name]
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false", TEXTWORLD_RL_GAMES=str(tmp_path / "games"))
    started = time.time()
    result = subprocess.run([sys.executable, *argv, "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=120)
    assert time.time() - started < 30
    assert_one_error_line(result.returncode, result.stderr, expected)
    assert "Loading weights" not in result.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a game that breaks while playing

def test_a_damaged_game_counts_as_crashed_not_as_a_0_percent_episode(tiny_games, tmp_path, capfd):
    damaged = copy_game(tiny_games[0], tmp_path / "damaged")
    damage_story_file(damaged)
    with BatchEnv([str(damaged)], num_envs=1, max_episode_turns=5) as env:
        env.reset()  # the damage does not show at the start
        (result,) = env.step(["look"])
        assert result.crashed and result.truncated and not result.terminated and env.restarts == 1
        assert result.next_state.episode == 1 and result.next_state.steps == 0  # the next episode, on a fresh process
    games = [str(damaged), tiny_games[1]]
    report = evaluate(RandomAgent(0), games, num_episodes=4, num_envs=2, max_episode_turns=3,
                      prompt_config=PromptConfig(), progress=False).report
    broken, healthy = ({row["game"]: row for row in report["games"]}[game_name(game)] for game in games)
    assert broken["crashed"] == 2 and broken["episodes"] == 0 and broken["normalized_score"] is None
    assert healthy["crashed"] == 0 and healthy["episodes"] == 2
    assert report["crashed"] == 2 and report["episodes"] == 2  # the crashed episodes are not played 0% episodes
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning: game")]
    assert len(warnings) == 2 and all("Emulator halted" in line for line in warnings)  # one per BatchEnv, not per crash


# ---------------------------------------------------------------- the Hub fails at the very end

def test_a_failed_final_push_keeps_the_outputs_and_says_how_to_push_them(trained_run):
    output, message, printed = trained_run
    assert message.startswith(f"error: pushing to the Hub repo {PUSH_REPO} failed (the Hub went away)")
    assert f"`python tools/push_to_hub.py {output} {PUSH_REPO}`" in message and "\n" not in message
    assert "after training" in printed  # the summary came first
    assert (output / "model.safetensors").is_file() and (output / "checkpoints" / "checkpoint-1").is_dir()


# ---------------------------------------------------------------- DeepSpeed checkpoints load without running code

def test_deepspeed_zero2_checkpoints_load_with_weights_only_and_resume(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "accelerate_configs/cpu_zero2.yaml", "ppo_textworld.py"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for iterations, resume in ((1, []), (2, ["--resume_from_checkpoint", "latest"])):
        argv = ppo_flags(tiny_model_path, tiny_games, output, num_iterations=iterations, action_mode="generate",
                         max_new_tokens=4, save_total_limit=0)
        result = subprocess.run([*launcher, *argv, *resume], cwd=ROOT, capture_output=True, text=True, env=env,
                                timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "resumed from" in result.stdout + result.stderr
    from accelerate.utils import load as accelerate_load

    files = [path for path in (output / "checkpoints").rglob("*") if path.suffix in (".pt", ".bin", ".pkl")]
    assert {path.parent.name for path in files} == {"pytorch_model", "training_state"}
    for path in files:
        if path.suffix == ".pkl":  # accelerate's RNG states: numpy arrays, which accelerate allows as it loads them
            accelerate_load(path, map_location="cpu", weights_only=True)
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    assert load_file(output / "model.safetensors")  # the resumed run finished and saved its model
