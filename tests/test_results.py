"""tools/results.py builds its tables and curves from the runs' own reports, with combined runs adding up."""

import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import results  # noqa: E402
from lib.arguments import parse_arguments  # noqa: E402


def write_run(root: Path, name: str, wall: float, report: dict | None = None, state: dict | None = None) -> None:
    out = root / "outputs/results/default" / name
    (out / "checkpoints/checkpoint-2").mkdir(parents=True)
    (out / "result.json").write_text(json.dumps({"command": f"cmd {name}", "wall_time_s": wall, "machine": "m"}))
    if report:
        (out / "report.json").write_text(json.dumps(report))
    if state:
        (out / "checkpoints/checkpoint-2/config.json").write_text("{}")
        (out / "checkpoints/checkpoint-2/trainer_state.json").write_text(json.dumps(state))


def test_table_reads_reports_and_trainer_states(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "ROOT", tmp_path)
    point = lambda steps, score: {"env_steps": steps, "normalized_score": score, "win_rate": score, "invalid_rate": 0.0}  # noqa: E731
    write_run(tmp_path, "random", 60, report={"normalized_score": 0.25, "win_rate": 0.25, "invalid_rate": 0.0})
    write_run(tmp_path, "rs_score", 600, state={"env_steps": 100, "eval_history": [point(0, 0.1), point(100, 0.5)]})
    write_run(tmp_path, "rs_then_ppo_score", 900, state={"env_steps": 40, "eval_history": [point(0, 0.5), point(40, 0.6)]})
    results.table(tmp_path / "docs")
    rows = {row["name"]: row for row in json.loads((tmp_path / "docs/results.json").read_text())}
    assert set(rows) == {"random", "rs_score", "rs_then_ppo_score"}  # runs that did not happen are left out
    assert rows["random"]["env_steps"] == 0 and rows["random"]["normalized_score"] == 0.25
    combined = rows["rs_then_ppo_score"]
    assert combined["env_steps"] == 140 and combined["wall_time_s"] == 1500 and combined["normalized_score"] == 0.6
    assert combined["curve"] == [[100, 0.5], [140, 0.6]] and combined["command"] == "cmd rs_score && cmd rs_then_ppo_score"
    markdown = (tmp_path / "docs/results.md").read_text()
    assert "(num_episodes=12, max_episode_turns=12)" in markdown and "| 0.600 | 0.600 [0.33, 0.82] | 0.000 | 140 | 25.0 min | m |" in markdown
    assert (tmp_path / "docs/curves_default.png").stat().st_size > 0


def test_table_keeps_the_rows_of_experiments_without_outputs_here(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "ROOT", tmp_path)
    earlier = [{"set": "default", "name": name, "method": name, "command": f"old {name}", "wall_time_s": 60,
                "machine": "m", "env_steps": 0, "curve": [], "normalized_score": score, "win_rate": score,
                "invalid_rate": 0.0} for name, score in (("walkthrough", 1.0), ("random", 0.9))]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/results.json").write_text(json.dumps(earlier))
    write_run(tmp_path, "random", 60, report={"normalized_score": 0.25, "win_rate": 0.25, "invalid_rate": 0.0})
    results.table(tmp_path / "docs")
    rows = {row["name"]: row for row in json.loads((tmp_path / "docs/results.json").read_text())}
    assert rows["walkthrough"]["command"] == "old walkthrough"  # not rerun: kept
    assert rows["random"]["normalized_score"] == 0.25  # rerun: its new outputs win
    assert list(rows) == ["random", "walkthrough"]  # in the experiments' order


def test_wilson_interval_matches_hand_computed_values():
    # 28 wins of 40: center (0.7 + 1.96^2/80) / (1 + 1.96^2/40), half-width 1.96/(1 + 0.096) * sqrt(0.21/40 + 0.0006)
    assert results.wilson_interval(28, 40) == pytest.approx((0.5457, 0.8193), abs=1e-4)
    assert results.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # never below 0
    assert results.wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


def test_unknown_experiment_is_named():
    with pytest.raises(SystemExit, match="unknown experiment 'default/nope'"):
        results.selected(["default/nope"])
    assert results.selected(["hard/random", "default/walkthrough"]) == [("hard", "random"), ("default", "walkthrough")]


@pytest.mark.parametrize("game_set,name", [(s, n) for s in results.EXPERIMENTS for n in results.EXPERIMENTS[s]])
def test_every_experiment_command_parses(game_set, name, monkeypatch):
    """Each command's script accepts its flags and YAML config, so no experiment fails after the ones before it ran."""
    monkeypatch.chdir(results.ROOT)
    command = results.EXPERIMENTS[game_set][name][0].format(out="outputs/results/x")
    python, script, *argv = shlex.split(command)  # as `run` splits it
    assert python == "python"
    module = __import__(script.removesuffix(".py"))
    if hasattr(module, "ALL_ARGUMENTS"):
        parsed = parse_arguments(module.ALL_ARGUMENTS, argv)
        assert parsed[0].output_dir == "outputs/results/x"
    else:
        assert module.parse_args(argv).output_dir == "outputs/results/x"


def test_run_skips_finished_experiments_and_stops_at_unfinished_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(results, "ROOT", tmp_path)
    ran = []

    def fake_run(argv, cwd):
        ran.append(argv)
        (Path(cwd) / argv[argv.index("--output_dir") + 1]).mkdir(parents=True)
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    monkeypatch.setattr(results, "machine_description", lambda: "m")
    finished = tmp_path / results.RESULTS_DIR / "default" / "random"
    finished.mkdir(parents=True)
    (finished / results.RESULT_FILE).write_text("{}")
    results.run([("default", "random"), ("default", "walkthrough")])
    assert "[default/random] done already, skipped" in capsys.readouterr().out
    assert len(ran) == 1 and "walkthrough" in " ".join(ran[0])
    (tmp_path / results.RESULTS_DIR / "default" / "zero_shot_score").mkdir()  # a run that stopped half-way
    with pytest.raises(SystemExit, match="unfinished run"):
        results.run([("default", "zero_shot_score")])
    assert len(ran) == 1
