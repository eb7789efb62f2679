"""Never lose a user's work: numbers that cannot train are refused before any model loads."""

from pathlib import Path

import pytest

import lib.training
import play
import ppo_textworld
import rejection_sampling
from lib.arguments import parse_arguments


# ---------------------------------------------------------------- numbers that cannot train


NON_FINITE = [
    (ppo_textworld, ["--learning_rate", "inf"], "--learning_rate"),
    (ppo_textworld, ["--clip_range", "nan"], "--clip_range"),
    (ppo_textworld, ["--kl_coef=-inf"], "--kl_coef"),
    (ppo_textworld, ["--gamma_turn", "nan"], "--gamma_turn"),
    (ppo_textworld, ["--temperature", "inf"], "--temperature"),
    (ppo_textworld, ["--score_weight", "nan"], "--score_weight"),  # no range of its own: only the generic check
    (rejection_sampling, ["--learning_rate", "nan"], "--learning_rate"),
    (rejection_sampling, ["--min_return", "inf"], "--min_return"),
    (rejection_sampling, ["--keep_top_percent", "nan"], "--keep_top_percent"),
    (rejection_sampling, ["--gamma=-inf"], "--gamma"),
    (play, ["--temperature", "inf"], "--temperature"),
    (play, ["--top_p", "nan"], "--top_p"),
]
NEGATIVE = [
    (ppo_textworld, ["--seed", "-1"], "--seed"),
    (rejection_sampling, ["--seed", "-1"], "--seed"),
    (play, ["--seed", "-1"], "--seed"),
    (ppo_textworld, ["--value_head_hidden_size", "-3"], "--value_head_hidden_size"),
]


def error_line(module, argv: list[str], tmp_path: Path, monkeypatch, capsys) -> str:
    """The one `error:` line a script's main ends with, any model load failing the test."""
    if module is play:
        monkeypatch.setattr(play, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
        assert play.main(["--agent", "model", *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]
    monkeypatch.setattr(lib.training, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--output_dir", str(tmp_path / "out"), "--report_to", "none"])  # a YAML file goes first
    return str(exit_info.value.code)


@pytest.mark.parametrize("module, argv, flag", NON_FINITE,
                         ids=[f"{module.__name__} {' '.join(argv)}" for module, argv, _ in NON_FINITE])
def test_a_non_finite_number_is_refused_naming_its_flag(module, argv, flag, tmp_path, monkeypatch, capsys):
    line = error_line(module, argv, tmp_path, monkeypatch, capsys)
    value = argv[-1].split("=")[-1]
    assert line == f"error: {flag} must be a finite number, got {float(value)}"


@pytest.mark.parametrize("module, argv, flag", NEGATIVE,
                         ids=[f"{module.__name__} {' '.join(argv)}" for module, argv, _ in NEGATIVE])
def test_a_negative_count_or_seed_is_refused_naming_its_flag(module, argv, flag, tmp_path, monkeypatch, capsys):
    line = error_line(module, argv, tmp_path, monkeypatch, capsys)
    assert line.startswith(f"error: {flag} must be >= 0, got -") and "\n" not in line


@pytest.mark.parametrize("module", [ppo_textworld, rejection_sampling])
def test_a_learning_rate_in_yaml_reads_as_a_number(module, tmp_path, monkeypatch, capsys):
    """YAML reads `1e-5` (no dot) as a string: it must still become the float flag, and `-1e-5` the usual range
    error rather than argparse taking it for a flag."""
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-5\n")
    learning_rate = next(group.learning_rate for group in parse_arguments(module.ALL_ARGUMENTS, [str(config)])
                         if hasattr(group, "learning_rate"))
    assert learning_rate == 1e-05 and isinstance(learning_rate, float)
    config.write_text("learning_rate: -1e-5\n")
    assert error_line(module, [str(config)], tmp_path, monkeypatch, capsys).endswith(
        "error: --learning_rate must be positive, got -1e-05")


def test_play_reads_a_yaml_number_without_a_dot(tmp_path):
    config = tmp_path / "play.yaml"
    config.write_text("temperature: 1e-5\ntop_p: -1e-5\n")
    args = play.parse_args([str(config)])
    assert args.temperature == 1e-05 and args.top_p == -1e-05
