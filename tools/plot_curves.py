"""Plot logged scalars of one or more training runs (their tensorboard logs) into a small PNG.

Launch:
    python tools/plot_curves.py outputs/ppo --keys eval/normalized_score charts/normalized_score --out docs/ppo.png
    python tools/plot_curves.py outputs/letter_e --keys objective/reward --x iteration --out docs/letter_e.png
    python tools/plot_curves.py outputs/ppo outputs/rs --labels ppo rs --keys eval/normalized_score --out docs/cmp.png
    python tools/plot_curves.py outputs/a outputs/b --keys eval/normalized_score --x wall_time env_steps --out c.png

x axis: `env_steps` (charts/env_steps logged at the same step; step 0 = before training), `iteration`, or
`wall_time` (minutes from the run's first logged event, which comes right after the model loads, to the moment a
value was logged); several give one panel each, side by side.
`--baseline NAME=VALUE` draws a horizontal reference line (e.g. the random agent's score).
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ENV_STEPS_KEY = "charts/env_steps"


def read_scalars(run_dir: Path, minutes: bool = False) -> dict[str, dict[int, float]]:
    """{key: {step: value}} over every event file under run_dir (later files win on repeated steps); with
    `minutes`, the minutes from the first file's first event to each value instead of the value."""
    files = sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no tensorboard event files under {run_dir}: was the run started with --report_to none?")
    scalars: dict[str, dict[int, float]] = {}
    started = None
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        started = events.FirstEventTimestamp() if started is None else started
        for key in events.Tags()["scalars"]:
            scalars.setdefault(key, {}).update(
                {e.step: (e.wall_time - started) / 60 if minutes else e.value for e in events.Scalars(key)})
    return scalars


def env_steps_axis(scalars: dict[str, dict[int, float]]) -> dict[int, float]:
    """Iteration -> environment steps used so far (0 before training)."""
    axis = {0: 0.0}
    axis.update(scalars.get(ENV_STEPS_KEY, {}))
    return axis


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output_dir of each run (their runs/ logs are read)")
    parser.add_argument("--keys", nargs="+", required=True, help="scalar keys to plot, e.g. eval/normalized_score")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: the folder names)")
    parser.add_argument("--x", nargs="+", choices=("env_steps", "iteration", "wall_time"), default=["env_steps"],
                        help="x axis; several: one panel each")
    parser.add_argument("--baseline", action="append", default=[], help="NAME=VALUE horizontal line, repeatable")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels: {len(labels)} labels for {len(args.runs)} runs")
    baselines = []
    for item in args.baseline:
        name, _, value = item.partition("=")
        try:
            baselines.append((name, float(value)))
        except ValueError:
            parser.error(f"--baseline {item!r}: expected NAME=VALUE with a number")

    figure, panels = plt.subplots(1, len(args.x), figsize=(6 * len(args.x), 3.6), dpi=100, squeeze=False)
    for run, label in zip(args.runs, labels):
        try:
            scalars, times = read_scalars(run / "runs"), read_scalars(run / "runs", minutes=True)
        except FileNotFoundError as error:
            sys.exit(f"error: {error}")
        steps_axis = env_steps_axis(scalars)
        for key in args.keys:
            if key not in scalars:
                sys.exit(f"error: {run} logged no {key!r}; it has: {', '.join(sorted(scalars))}")
            points = sorted(scalars[key].items())
            for axes, x in zip(panels[0], args.x):
                if x == "env_steps":
                    xs = [steps_axis.get(step, float("nan")) for step, _ in points]
                elif x == "wall_time":
                    xs = [times[key][step] for step, _ in points]
                else:
                    xs = [step for step, _ in points]
                name = key if len(args.runs) == 1 else f"{label}: {key}"
                axes.plot(xs, [value for _, value in points], marker="o", markersize=3, label=name)
    for axes, x in zip(panels[0], args.x):
        for name, value in baselines:
            axes.axhline(value, linestyle="--", color="gray", linewidth=1)
            axes.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray",
                          xycoords=("axes fraction", "data"))
        axes.set_xlabel({"env_steps": "environment steps", "iteration": "iteration", "wall_time": "wall time (min)"}[x])
        axes.set_title(args.title, fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
