"""A user's work is never lost: one run owns its output folder (a lock file), files that no textworld-rl run wrote are
never overwritten, every path a run writes and the prompt budget are checked before any model loads or game is
generated, and an evaluation that shares games with training is not called held out."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_loadable_training_state

import lib.training
import play
import ppo_textworld
import rejection_sampling
from lib.run_folder import (
    LOCK_FILE,
    MARKER_FILE,
    check_no_foreign_outputs,
    lock_output_dir,
    record_outputs,
    release_output_dirs,
)
from lib.training import RunArguments, TrainingRun, model_card

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"ppo": ppo_textworld, "rs": rejection_sampling}
USER_FILES = {"README.md": b"# my notes\n", "config.json": b'{"mine": true}\n'}


def env() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def run(script: str, args: list[str], cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          env=env(), timeout=timeout)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused run ends with (and no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    return errors[0]


def flags(**values) -> list[str]:
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def tiny_flags(script: str, model: str, games: list[str], output: Path, **overrides) -> list[str]:
    """A short run of `script` (ppo, rs or play) on the tiny model and games."""
    common = {"model_name_or_path": model, "output_dir": output, "max_episode_turns": 3, "action_mode": "generate",
              "max_new_tokens": 4}
    if script == "play":
        return flags(**common, games=",".join(games), num_episodes=2, agent="model", **overrides)
    common.update(train_games=",".join(games), eval_games=",".join(games), num_envs=2, eval_episodes=2,
                  trainable_layers_fraction=0.5, progress=False, report_to="none", gradient_accumulation_steps=1)
    if script == "ppo":
        return flags(**common, num_iterations=1, turns_per_slot=2, num_minibatches=2, **overrides)
    return flags(**common, num_rounds=1, episodes_per_round=2, train_batch_size=2, **overrides)


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its bytes (None for a folder) and permission bits."""
    return {str(path.relative_to(folder)): (None if path.is_dir() else path.read_bytes(), path.stat().st_mode)
            for path in sorted(folder.rglob("*"))}


def write_user_files(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)


class ModelLoadReached(Exception):
    """Raised in place of loading a model: every check before it passed."""


def reach_model_load(*args, **kwargs):
    raise ModelLoadReached


def forbid_model_load(*args, **kwargs):
    pytest.fail("a model was loaded")


@pytest.fixture(autouse=True)
def no_lock_left_in_this_process():
    """Scripts called in-process that stop at a monkeypatched model load keep their folder's lock: give it up."""
    yield
    release_output_dirs()


# ---- (a) one run per output folder


def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_finishes(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "ppo"
    args = tiny_flags("ppo", tiny_model_path, tiny_games, output)
    first = subprocess.Popen([sys.executable, "ppo_textworld.py", *args], cwd=ROOT, env=env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (output / LOCK_FILE).exists():
        assert first.poll() is None, first.communicate()[1][-3000:]
        assert time.time() < deadline, "the first run took no lock within 120 s"
        time.sleep(0.05)

    second = run("ppo_textworld.py", args)
    assert first.poll() is None, "the first run ended before the second was refused: nothing was tested"
    line = error_line(second)
    for text in (f"--output_dir {output} is in use", f"pid {first.pid} on {socket.gethostname()}",
                 str(output / LOCK_FILE), "wait for it to end or pass another --output_dir"):
        assert text in line, f"{text!r} not in {line!r}"

    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stdout[-2000:] + stderr[-4000:]
    for name in ("model.safetensors", "config.json", "README.md", "training_args.json", "value_head.safetensors",
                 "checkpoints/checkpoint-1/trainer_state.json", "rollouts/iteration-00001"):
        assert (output / name).exists(), name
    assert not (output / LOCK_FILE).exists()  # released at the end
    recorded = json.loads((output / MARKER_FILE).read_text())["outputs"]
    assert {"README.md", "config.json", "model.safetensors", "training_args.json"} <= set(recorded)
    # Its eval games are its training games: said once, and recorded in the trainer state and the model card.
    assert (stdout + stderr).count("warning: 2 of the 2 --eval_games are --train_games too") == 1, stdout[-3000:]
    state = json.loads((output / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["eval_held_out"] is False
    card = (output / "README.md").read_text()
    assert "not held out" in card and "Held-out" not in card


# ---- (b) a stale lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder: Path, pid: int, host: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": "2024-01-01T00:00:00+00:00"}))
    return lock


def test_a_stale_lock_is_taken_over_with_a_warning(tiny_games, tmp_path):
    output = tmp_path / "eval"
    pid = dead_pid()
    lock = write_lock(output, pid, socket.gethostname())
    result = run("play.py", flags(agent="random", games=",".join(tiny_games), output_dir=output))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(lock) in warnings[0] and f"pid {pid}" in warnings[0], result.stderr[-3000:]
    assert "no longer runs" in warnings[0] and "taking --output_dir over" in warnings[0]
    assert (output / "report.json").is_file() and not lock.exists()


def test_a_stale_lock_is_taken_over_by_a_trainer_too(tiny_model_path, tiny_games, tmp_path, monkeypatch, capsys):
    output = tmp_path / "ppo"
    lock = write_lock(output, dead_pid(), socket.gethostname())
    monkeypatch.setattr(lib.training, "load_model", reach_model_load)
    with pytest.raises(ModelLoadReached):
        ppo_textworld.main(tiny_flags("ppo", tiny_model_path, tiny_games, output))
    assert f"warning: {lock} was left by pid" in capsys.readouterr().err
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # this run holds it now


def test_a_lock_from_another_machine_is_never_taken_over(tmp_path):
    """Whether its run still runs cannot be checked from here: refused, saying how to clear it."""
    lock = write_lock(tmp_path / "out", dead_pid(), "another-machine.example")
    before = lock.read_bytes()
    with pytest.raises(ValueError, match=f"in use by another run: pid .* on another-machine.example.*delete {lock}"):
        lock_output_dir(tmp_path / "out")
    assert lock.read_bytes() == before


# ---- (c) a user's files are never overwritten


@pytest.mark.parametrize("script", ["ppo", "rs"])
def test_a_trainer_refuses_a_folder_of_user_files_unless_told_to_overwrite(script, tiny_model_path, tiny_games,
                                                                          tmp_path, monkeypatch):
    output = tmp_path / "mine"
    write_user_files(output, USER_FILES)
    before = snapshot(tmp_path)
    args = tiny_flags(script, tiny_model_path, tiny_games, output)
    line = error_line(run(f"{SCRIPTS[script].__name__}.py", args))
    assert f"--output_dir {output} holds README.md, config.json" in line and "--overwrite_output_dir" in line
    assert snapshot(tmp_path) == before

    monkeypatch.setattr(lib.training, "load_model", reach_model_load)
    with pytest.raises(ModelLoadReached):  # every check passed
        SCRIPTS[script].main([*args, "--overwrite_output_dir", "true"])
    assert all((output / name).read_bytes() == content for name, content in USER_FILES.items())


def test_play_refuses_a_report_it_did_not_write_unless_told_to_overwrite(tiny_games, tmp_path):
    output = tmp_path / "mine"
    user_files = {**USER_FILES, "report.json": b'{"my": "report"}\n'}
    write_user_files(output, user_files)
    before = snapshot(tmp_path)
    args = flags(agent="random", games=",".join(tiny_games), output_dir=output)
    line = error_line(run("play.py", args))
    assert f"--output_dir {output} holds report.json" in line and "--overwrite_output_dir" in line
    assert snapshot(tmp_path) == before

    assert run("play.py", [*args, "--overwrite_output_dir", "true"]).returncode == 0
    assert json.loads((output / "report.json").read_text())["agent"] == "random"
    assert all((output / name).read_bytes() == content for name, content in USER_FILES.items())
    # Now the report is play.py's own: a rerun replaces it without the flag.
    assert run("play.py", args).returncode == 0


@pytest.mark.parametrize("script", ["ppo", "rs"])
def test_the_current_folder_with_its_readme_is_refused(script, monkeypatch):
    monkeypatch.setattr(lib.training, "load_model", forbid_model_load)
    readme = (ROOT / "README.md").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main(["--output_dir", ".", "--report_to", "none"])
    message = str(exit_info.value.code)
    assert message.startswith("error: --output_dir . holds README.md") and "\n" not in message
    assert (ROOT / "README.md").read_bytes() == readme and not (ROOT / LOCK_FILE).exists()


def test_resuming_a_run_in_its_folder_stays_allowed(tiny_model_path, tiny_games, tmp_path, monkeypatch):
    """A checkpoint inside output_dir is a run of ours there, even one written before the marker existed."""
    output = tmp_path / "ppo"
    write_user_files(output, USER_FILES)  # the final model of that run, unrecorded
    checkpoint = output / "checkpoints" / "checkpoint-1"
    write_loadable_training_state(checkpoint / "training_state")
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"iteration": 1, "num_processes": 1}))
    monkeypatch.setattr(lib.training, "load_model", reach_model_load)
    with pytest.raises(ModelLoadReached):
        ppo_textworld.main([*tiny_flags("ppo", tiny_model_path, tiny_games, output), "--num_iterations", "2",
                            "--resume_from_checkpoint", "latest"])


def test_only_the_files_a_run_recorded_are_its_own(tmp_path):
    write_user_files(tmp_path, USER_FILES)
    record_outputs(tmp_path, ["README.md"])
    with pytest.raises(ValueError, match=r"holds config\.json, which"):
        check_no_foreign_outputs(tmp_path, lib.training.TRAINING_OUTPUTS)
    record_outputs(tmp_path, ["config.json"])
    check_no_foreign_outputs(tmp_path, lib.training.TRAINING_OUTPUTS)


# ---- (d) every path a run writes, checked before anything loads


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this user cannot write into: a read-only one, or for root (who writes into those anyway) a folder
    of a read-only kernel file system."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return folder
    folder.chmod(0o700)
    if Path("/proc/sys").is_dir() and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")
    pytest.skip("no folder here that this user cannot write into")


# (script, flags, texts the error line holds). {tmp}: the test's tmp_path, holding the file `a_file`.
BAD_PATHS = {
    "ppo: output dir under a file": ("ppo", ["--output_dir", "{tmp}/a_file/out"], ["--output_dir {tmp}/a_file/out", "under the file {tmp}/a_file"]),
    "rs: output dir under a file": ("rs", ["--output_dir", "{tmp}/a_file/out"], ["--output_dir {tmp}/a_file/out", "under the file {tmp}/a_file"]),
    "play: output dir under a file": ("play", ["--output_dir", "{tmp}/a_file/out"], ["--output_dir {tmp}/a_file/out", "under the file {tmp}/a_file"]),
    "ppo: unwritable output dir": ("ppo", ["--output_dir", "{read_only}/out"], ["--output_dir {read_only}/out cannot be created", "not writable"]),
    "play: unwritable output dir": ("play", ["--output_dir", "{read_only}"], ["--output_dir {read_only} is not writable"]),
    "ppo: checkpoints folder is a file": ("ppo", ["--output_dir", "{tmp}/out_checkpoints"], ["{tmp}/out_checkpoints/checkpoints (the checkpoints of --output_dir) is a file"]),
    "rs: tracker log folder is a file": ("rs", ["--output_dir", "{tmp}/out_runs", "--report_to", "tensorboard"], ["{tmp}/out_runs/runs (the tracker logs of --output_dir) is a file"]),
    "ppo: empty games dir": ("ppo", ["--games_dir", ""], ["--games_dir is empty"]),
    "play: empty games dir": ("play", ["--games_dir", ""], ["--games_dir is empty"]),
    "rs: empty $TEXTWORLD_RL_GAMES": ("rs", ["--env", ""], ["$TEXTWORLD_RL_GAMES is set but empty"]),
    "play: empty $TEXTWORLD_RL_GAMES": ("play", ["--env", ""], ["$TEXTWORLD_RL_GAMES is set but empty"]),
    "ppo: games dir under a file": ("ppo", ["--games_dir", "{tmp}/a_file/games"], ["--games_dir {tmp}/a_file/games", "under the file {tmp}/a_file"]),
    "play: games dir under a file": ("play", ["--games_dir", "{tmp}/a_file/games"], ["--games_dir {tmp}/a_file/games", "under the file {tmp}/a_file"]),
    "rs: games dir is a file": ("rs", ["--games_dir", "{tmp}/a_file"], ["--games_dir {tmp}/a_file is a file"]),
    "ppo: $TEXTWORLD_RL_GAMES under a file": ("ppo", ["--env", "{tmp}/a_file/games"], ["$TEXTWORLD_RL_GAMES {tmp}/a_file/games", "under the file", "set $TEXTWORLD_RL_GAMES to another folder"]),
}


@pytest.mark.parametrize("name", list(BAD_PATHS))
def test_a_bad_path_fails_before_anything_loads_and_changes_nothing(name, tmp_path, monkeypatch, capsys):
    script, args, expected = BAD_PATHS[name]
    (tmp_path / "a_file").write_text("a user's file\n")
    for folder in ("checkpoints", "runs"):  # a file where the run writes a folder of output_dir
        (tmp_path / f"out_{folder}").mkdir()
        (tmp_path / f"out_{folder}" / folder).write_text("not a folder\n")
    read_only = unwritable_folder(tmp_path) if "{read_only}" in " ".join(args) else None
    fill = lambda text: text.replace("{tmp}", str(tmp_path)).replace("{read_only}", str(read_only))  # noqa: E731
    args = [fill(arg) for arg in args]
    monkeypatch.setenv("TEXTWORLD_RL_GAMES", str(tmp_path / "games"))  # games go there, never into ./games
    if args[0] == "--env":
        monkeypatch.setenv("TEXTWORLD_RL_GAMES", args.pop(1))
        args.pop(0)
    for module, loader in ((lib.training, "load_model"), (lib.training, "load_tokenizer"), (play, "load_model"),
                           (play, "load_tokenizer"), (play, "resolve_games")):
        monkeypatch.setattr(module, loader, forbid_model_load)
    before = snapshot(tmp_path)

    if script == "play":
        assert play.main(["--agent", "random", "--games", "tiny", *args]) == 2
        message = capsys.readouterr().err.strip()
    else:
        with pytest.raises(SystemExit) as exit_info:
            SCRIPTS[script].main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *args])
        message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    for text in expected:
        assert fill(text) in message, f"{fill(text)!r} not in {message!r}"
    assert snapshot(tmp_path) == before


# ---- (e) held out means held out


def test_eval_games_shared_with_training_are_not_called_held_out(tiny_games, tmp_path, capsys):
    def training_run(train: list[str], held_out: list[str]) -> TrainingRun:
        run = RunArguments(output_dir=str(tmp_path / "out"), train_games=",".join(train),
                           eval_games=",".join(held_out), report_to="none", progress=False)
        return TrainingRun(run, {}, None, "iteration", 1, started=0.0)

    def card(training: TrainingRun) -> str:
        return model_card(training.run, title="t", tags=["ppo"], description="d", evals={}, action_mode="score",
                          held_out=training.held_out)

    # The same file under another spelling of its path is the same game.
    other_spelling = str(Path(tiny_games[1]).parent / ".." / Path(tiny_games[1]).parent.name / Path(tiny_games[1]).name)
    shared = training_run(tiny_games, [tiny_games[0], other_spelling])
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: 2 of the 2 --eval_games are --train_games too: the evaluation is not held out; "
                        "pass game sources that share no game (a named set or generator spec uses its eval split)"]
    assert shared.state["eval_held_out"] is False and "not held out" in card(shared)

    disjoint = training_run(tiny_games[:1], tiny_games[1:])
    assert "warning:" not in capsys.readouterr().out
    assert disjoint.state["eval_held_out"] is True and "Held-out evaluation" in card(disjoint)


# ---- (f) a prompt budget too small for the instruction


@pytest.mark.parametrize("budget", [8, 40])
@pytest.mark.parametrize("script", ["ppo", "rs", "play"])
def test_a_prompt_budget_too_small_for_the_instruction_is_refused_before_the_model_loads(
    script, budget, tiny_model_path, tiny_games, tmp_path, monkeypatch, capsys
):
    """8 is under the 32 any prompt needs; 40 passes that floor but not the instruction (59 tokens in the chat
    format): found with the tokenizer alone."""
    monkeypatch.setattr(lib.training, "load_model", forbid_model_load)
    monkeypatch.setattr(play, "load_model", forbid_model_load)
    args = tiny_flags(script, tiny_model_path, tiny_games, tmp_path / "out", max_prompt_tokens=budget)
    if script == "play":
        assert play.main(args) == 2
        message = capsys.readouterr().err.strip()
    else:
        with pytest.raises(SystemExit) as exit_info:
            SCRIPTS[script].main(args)
        message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert "max_prompt_tokens" in message
    if budget == 40:
        assert "--max_prompt_tokens 40 cannot hold the instruction" in message
        assert "raise --max_prompt_tokens" in message
    release_output_dirs()  # as the script's process does when it exits
    assert not (tmp_path / "out").exists()


def test_play_names_the_training_args_that_set_the_budget(tiny_model_path, tiny_games, tmp_path, monkeypatch, capsys):
    """The budget came from a training run's settings, not from a flag: the error says which file."""
    monkeypatch.setattr(play, "load_model", forbid_model_load)
    trained = tmp_path / "trained"
    shutil.copytree(tiny_model_path, trained)
    (trained / "training_args.json").write_text(json.dumps({"max_prompt_tokens": 40}))
    assert play.main(["--model_name_or_path", str(trained), "--games", ",".join(tiny_games)]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"error: {trained / 'training_args.json'}: --max_prompt_tokens 40 cannot hold")


@pytest.mark.parametrize("script", ["ppo", "play"])
def test_game_files_need_no_writable_games_cache(script, tiny_games, tmp_path, monkeypatch, capsys):
    """Game files are started once and the success remembered in the games cache, an optimisation only: a cache that
    cannot take the record (here under a file; a run on game files generates nothing there) must not stop the run
    with a traceback. play.py plays; PPO gets as far as loading its model."""
    (tmp_path / "a_file").write_text("a user's file\n")
    games = ["--games_dir", str(tmp_path / "a_file" / "games")]
    if script == "play":
        assert play.main(["--agent", "random", "--games", tiny_games[0], "--max_episode_turns", "2", *games]) == 0
        assert "error" not in capsys.readouterr().err
    else:
        monkeypatch.setattr(lib.training, "load_model", reach_model_load)
        with pytest.raises(ModelLoadReached):
            ppo_textworld.main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--train_games",
                                ",".join(tiny_games), "--eval_games", tiny_games[0], *games])
