import subprocess
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "plot_curves.py"


def write_run(folder: Path) -> None:
    writer = SummaryWriter(str(folder / "runs" / "runs"))
    writer.add_scalar("eval/normalized_score", 0.1, 0)
    for iteration in (1, 2, 3):
        writer.add_scalar("charts/env_steps", 64 * iteration, iteration)
        writer.add_scalar("objective/reward", 0.5 * iteration, iteration)
    writer.add_scalar("eval/normalized_score", 0.4, 3)
    writer.close()


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT)


def test_plots_logged_scalars_to_png(tmp_path):
    write_run(tmp_path / "run")
    out = tmp_path / "docs" / "curve.png"
    result = plot(str(tmp_path / "run"), "--keys", "eval/normalized_score", "objective/reward",
                  "--baseline", "random=0.33", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_key_and_missing_logs_are_named(tmp_path):
    write_run(tmp_path / "run")
    result = plot(str(tmp_path / "run"), "--keys", "charts/nope", "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "charts/nope" in result.stderr and "objective/reward" in result.stderr
    result = plot(str(tmp_path / "empty"), "--keys", "objective/reward", "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "no tensorboard event files" in result.stderr


def test_wall_time_axis_counts_minutes_from_the_first_event(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from plot_curves import read_scalars

    writer = SummaryWriter(str(tmp_path / "run" / "runs"))
    writer.add_scalar("eval/normalized_score", 0.1, 0, walltime=1000.0)
    writer.add_scalar("eval/normalized_score", 0.5, 2, walltime=1000.0 + 90)
    writer.close()
    minutes = read_scalars(tmp_path / "run" / "runs", minutes=True)["eval/normalized_score"]
    assert minutes[2] - minutes[0] == 1.5
    out = tmp_path / "two.png"
    result = plot(str(tmp_path / "run"), "--keys", "eval/normalized_score", "--x", "wall_time", "env_steps",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
