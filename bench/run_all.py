"""Run every benchmark and write one table of what each measured against its goal.

    python bench/run_all.py                    # all of them, about 40 min on 2 CPU cores
    python bench/run_all.py --only env scoring # these again; the others' rows stay as last measured

Each bench script runs as its own process (so one's threads and memory do not colour another's) and prints one JSON
object as its last line; each ratio there was measured within that one run, so it holds on a noisy machine. Written:
docs/benchmarks.md (the table) and docs/benchmarks.json (the table's rows and every script's raw JSON).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.training import machine_description  # noqa: E402

BENCHES = ("env", "scoring", "ppo", "rollout", "context")

# bench -> [(row name, JSON key, goal, "min" when the value must reach the goal / "max" when it must stay below it)]
ROWS = {
    "env": [("batched env: steps/s of 16 slots / 1 slot", "ratio", 8.0, "min")],
    "scoring": [("cached scoring: naive time / cached time", "ratio", 4.0, "min")],
    "ppo": [
        ("PPO update FLOP/s / dense matmul FLOP/s", "ratio", 0.6, "min"),
        ("peak RSS of one default PPO iteration (GiB)", "peak_rss_gib", 4.0, "max"),
    ],
    "rollout": [
        ("rollout, generate mode: env steps/s", "generate_env_steps_per_s", None, None),
        ("rollout, generate mode: tokens/s read by the policy", "generate_tokens_per_s", None, None),
        ("rollout, generate mode: generated tokens/s", "generate_generated_tokens_per_s", None, None),
        ("rollout, score mode: env steps/s", "score_env_steps_per_s", None, None),
        ("rollout, score mode: tokens/s read by the policy", "score_tokens_per_s", None, None),
    ],
    "context": [
        ("training env steps/s, --context window / before the shared trunk, 12-turn episodes", "quick_window_speedup", None, None),
        ("training env steps/s, --context episode / before the shared trunk (window), 12-turn episodes", "quick_episode_speedup", 2.0, "min"),
        ("training env steps/s, --context window / before the shared trunk, 50-turn episodes", "long_window_speedup", None, None),
        ("training env steps/s, --context episode / before the shared trunk (window), 50-turn episodes", "long_episode_speedup", 3.0, "min"),
        ("peak RSS of --context episode training, 50-turn episodes (GiB)", "long_episode_peak_rss_gib", 4.0, "max"),
    ],
}


def run_bench(name: str) -> tuple[dict, float]:
    started = time.time()
    result = subprocess.run([sys.executable, str(ROOT / "bench" / f"bench_{name}.py")], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"error: bench/bench_{name}.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    print(result.stdout, end="", flush=True)
    return json.loads(result.stdout.strip().splitlines()[-1]), time.time() - started


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES), help="benchmarks to run")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where benchmarks.md/json go")
    args = parser.parse_args(argv)
    machine = machine_description()
    rows, raw = [], {}
    earlier = args.docs / "benchmarks.json"
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    if set(args.only) != set(BENCHES) and kept.get("machine") == machine:  # keep the other benches' rows
        rows = [row for row in kept["rows"] if row["bench"] not in args.only]
        raw = {name: value for name, value in kept["raw"].items() if name not in args.only}
    for name in args.only:
        print(f"[bench_{name}]", flush=True)
        raw[name], seconds = run_bench(name)
        for label, key, goal, direction in ROWS[name]:
            value = raw[name][key]
            met = None if goal is None else (value >= goal if direction == "min" else value <= goal)
            rows.append({"bench": name, "measure": label, "value": value, "goal": goal, "direction": direction, "met": met})
        print(f"[bench_{name}] {seconds:.0f} s", flush=True)
    lines = [f"Measured by `python bench/run_all.py` on {machine}.", "",
             "| measure | value | goal | met |", "|---|---|---|---|"]
    for row in rows:
        goal = "" if row["goal"] is None else (">= " if row["direction"] == "min" else "<= ") + f"{row['goal']:g}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['measure']} | {row['value']:.3g} | {goal} | {met} |")
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / "benchmarks.md").write_text("\n".join(lines) + "\n")
    (args.docs / "benchmarks.json").write_text(json.dumps({"machine": machine, "rows": rows, "raw": raw}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
