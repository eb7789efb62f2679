"""The README's Results: run its experiments, then build the tables and learning curves from their outputs.

    python tools/results.py run default            # every experiment on the default games (~75 min on 2 CPU cores)
    python tools/results.py run hard/ppo_score     # one experiment (set/name), or a whole set
    python tools/results.py table                  # docs/results.md, docs/results.json, docs/curves_<set>.png
                                                   # (experiments not run here keep their rows of docs/results.json)

Each experiment is one command line (below) writing to outputs/results/<set>/<name>/; `run` times it and writes
result.json there (command, wall time, machine); an experiment with its result.json is skipped, so that a run stopped
half-way goes on with the next one. `table` reads every result.json with its run's own report: play.py's
report.json, or a trainer's last trainer_state.json (its final held-out evaluation, environment steps, and the
evaluations along the way for the curves). An experiment that starts from another's model (`after`) counts that
one's environment steps and wall time too. Every row is then the held-out eval split of its game set, with the same
number of episodes and step limit for every agent of the set.
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lib.models import newest_checkpoint  # noqa: E402
from lib.training import machine_description  # noqa: E402

RESULTS_DIR = Path("outputs/results")
RESULT_FILE = "result.json"

# The eval protocol of each set: the trainers' defaults (or the set's YAML configs) use the same episodes and limit.
EVAL = {
    "default": "--num_episodes 12 --max_episode_turns 12",
    "hard": "--games hard --num_episodes 16 --max_episode_turns 30",
    # The other engines' sets (README "TextWorldExpress and ScienceWorld"): one eval episode per held-out game.
    "twx": "--games twx --num_episodes 32 --max_episode_turns 20",
    "sciworld-easy": "--games sciworld-easy --num_episodes 16 --max_episode_turns 20",
    # The game kinds of issue 15 (lib/games.py's sets): each held-out game once, up to 50 turns, greedy.
    "hunts-easy": "--games hunts-easy --num_episodes 40 --max_episode_turns 50",
    "hunts-hard": "--games hunts-hard --num_episodes 24 --max_episode_turns 50",
    "cooking-levels": "--games cooking-levels --num_episodes 16 --max_episode_turns 50",
    # Levels no per-kind set trains on (7 and 9, between hunts-easy's 1-5 and hunts-hard's 10-20): how a model
    # trained on hunts-easy generalizes.
    "hunts-unseen": "--games tw-coin_collector:level=7:n=6,tw-coin_collector:level=9:n=6,"
                    "tw-treasure_hunter:level=7:n=6,tw-treasure_hunter:level=9:n=6 --num_episodes 24 "
                    "--max_episode_turns 50",
}
# set -> name -> (command with {out} for the output folder, experiment it starts from or None, label)
EXPERIMENTS = {
    "default": {
        "random": (f"python play.py --agent random {EVAL['default']} --output_dir {{out}}", None, "random admissible"),
        "walkthrough": (f"python play.py --agent walkthrough {EVAL['default']} --output_dir {{out}}", None, "walkthrough"),
        "zero_shot_generate": (f"python play.py --action_mode generate {EVAL['default']} --output_dir {{out}}", None,
                               "zero-shot SmolLM2-135M, generate"),
        "zero_shot_score": (f"python play.py {EVAL['default']} --output_dir {{out}}", None, "zero-shot SmolLM2-135M, score"),
        "ppo_score": ("python ppo_textworld.py --output_dir {out}", None, "PPO, score (the quick start)"),
        "ppo_generate": ("python ppo_textworld.py --action_mode generate --output_dir {out}", None, "PPO, generate"),
        "rs_score": ("python rejection_sampling.py --output_dir {out}", None, "rejection sampling, score"),
        "rs_then_ppo_score": ("python ppo_textworld.py --model_name_or_path outputs/results/default/rs_score "
                              "--output_dir {out}", "rs_score", "rejection sampling, then PPO (score)"),
    },
    "hard": {
        "random": (f"python play.py --agent random {EVAL['hard']} --output_dir {{out}}", None, "random admissible"),
        "walkthrough": (f"python play.py --agent walkthrough {EVAL['hard']} --output_dir {{out}}", None, "walkthrough"),
        "zero_shot_generate": (f"python play.py --action_mode generate {EVAL['hard']} --output_dir {{out}}", None,
                               "zero-shot SmolLM2-135M, generate"),
        "zero_shot_score": (f"python play.py {EVAL['hard']} --output_dir {{out}}", None, "zero-shot SmolLM2-135M, score"),
        "ppo_score": ("python ppo_textworld.py configs/ppo_hard.yaml --output_dir {out}", None, "PPO, score"),
        "ppo_generate": ("python ppo_textworld.py configs/ppo_hard.yaml --action_mode generate --eval_every 0 "
                         "--output_dir {out}", None, "PPO, generate"),
        "rs_score": ("python rejection_sampling.py configs/rs_hard.yaml --output_dir {out}", None,
                     "rejection sampling, score"),
        "rs_then_ppo_score": ("python ppo_textworld.py configs/ppo_hard.yaml --model_name_or_path "
                              "outputs/results/hard/rs_score --output_dir {out}", "rs_score",
                              "rejection sampling, then PPO (score)"),
    },
}


# PPO iterations (64 env steps each) that fit in about an hour of the 2 CPU cores: a ScienceWorld turn costs ~3x a
# TextWorldExpress one (room descriptions and action lists are long, its engine is slower).
PPO_ITERATIONS = {"twx": 12, "sciworld-easy": 6}


def baselines(game_set: str, walkthrough_label: str = "walkthrough") -> dict:
    """A set's baselines on its eval split as EVAL[game_set] plays it: the random agent, the walkthrough and the
    zero-shot model in score mode."""
    play = f"python play.py {EVAL[game_set]} --output_dir {{out}}"
    return {
        "random": (play.replace("play.py", "play.py --agent random"), None, "random admissible"),
        "walkthrough": (play.replace("play.py", "play.py --agent walkthrough"), None, walkthrough_label),
        "zero_shot_score": (play, None, "zero-shot SmolLM2-135M, score"),
    }


def eval_flags(game_set: str) -> dict[str, str]:
    """EVAL[game_set] as {flag: value}: `--num_episodes 12 ...` -> {"--num_episodes": "12", ...}."""
    words = EVAL[game_set].split()
    return dict(zip(words[::2], words[1::2]))


def engine_experiments(game_set: str) -> dict:
    """A TextWorldExpress or ScienceWorld set's experiments: the baselines, the zero-shot model in both modes and the
    trainers with their defaults, trained on the set's train split and evaluated on its eval split."""
    flags = eval_flags(game_set)
    play = f"python play.py {EVAL[game_set]} --output_dir {{out}}"
    train = (f"--train_games {flags['--games']} --eval_games {flags['--games']} --eval_episodes "
             f"{flags['--num_episodes']} --max_episode_turns {flags['--max_episode_turns']} --output_dir {{out}}")
    return {
        **baselines(game_set, walkthrough_label="gold path"),
        "zero_shot_generate": (play.replace("play.py", "play.py --action_mode generate"), None,
                               "zero-shot SmolLM2-135M, generate"),
        "ppo_score": (f"python ppo_textworld.py --num_iterations {PPO_ITERATIONS[game_set]} --eval_every 6 {train}",
                      None, "PPO, score"),
        "ppo_generate": (f"python ppo_textworld.py --action_mode generate {train}", None, "PPO, generate"),
        "rs_score": (f"python rejection_sampling.py {train}", None, "rejection sampling, score"),
    }


EXPERIMENTS.update({game_set: engine_experiments(game_set) for game_set in ("twx", "sciworld-easy")})


def least_tried_baselines(game_set: str) -> dict:
    """The random agent and the zero-shot model choosing among the commands played least often at the same
    place (--least_tried): how much of a trained policy's score the exploration rule alone gives."""
    play = f"python play.py --least_tried {EVAL[game_set]} --output_dir {{out}}"
    return {
        "random_least_tried": (play.replace("play.py", "play.py --agent random"), None,
                               "random admissible, --least_tried"),
        "zero_shot_score_least_tried": (play, None, "zero-shot SmolLM2-135M, score, --least_tried"),
    }


EXPERIMENTS.update({game_set: {**baselines(game_set), **least_tried_baselines(game_set)}
                    for game_set in ("hunts-easy", "hunts-hard", "cooking-levels")})
def critic_free(config: str, estimator: str, flags: str = "") -> str:
    """The command training `config` without a value head: `estimator` over groups of 4 slots, then `flags`."""
    return f"python ppo_textworld.py {config} --advantage_estimator {estimator} --group_size 4{flags}"


EXPERIMENTS["hunts-easy"].update({
    "ppo_score": ("python ppo_textworld.py configs/ppo_hunts_easy.yaml --least_tried false --output_dir {out}", None,
                  "PPO, score, --mark_tried, revisit reward"),
    "ppo_score_least_tried": ("python ppo_textworld.py configs/ppo_hunts_easy.yaml --output_dir {out}", None,
                              "PPO, score, --least_tried, --mark_tried, revisit reward"),
    # The same recipe without a value head: each episode against the 3 others of its group on the same game (gigpo:
    # and each turn against the group's turns from the same state).
    **{f"ppo_{estimator}": (critic_free("configs/ppo_hunts_easy.yaml", estimator) + " --output_dir {out}", None,
                            f"the same, --advantage_estimator {estimator} --group_size 4")
       for estimator in ("grpo", "rloo", "gigpo")},
    # The recipe (and its best critic-free variant) on a second seed: one seed is not a recipe.
    "ppo_score_least_tried_seed1": ("python ppo_textworld.py configs/ppo_hunts_easy.yaml --seed 1 --output_dir {out}",
                                    None, "PPO, score, --least_tried, --mark_tried, revisit reward, --seed 1"),
    "ppo_rloo_seed1": (critic_free("configs/ppo_hunts_easy.yaml", "rloo") + " --seed 1 --output_dir {out}", None,
                       "the same as rloo, --seed 1"),
})


def played_elsewhere(game_set: str, trained: str, label: str) -> tuple:
    """The model of experiment `trained` (set/name) played greedy on `game_set`'s eval split: how it generalizes."""
    return (f"python play.py --model_name_or_path {RESULTS_DIR / trained} {EVAL[game_set]} --output_dir {{out}}", None,
            label)


# hunts-hard without a value head: whole episodes per iteration, so half the iterations for about PPO's env steps.
HUNTS_HARD_CRITIC_FREE_FLAGS = " --num_iterations 4"
EXPERIMENTS["hunts-hard"].update({
    "ppo_score_least_tried": ("python ppo_textworld.py configs/ppo_hunts_hard.yaml --output_dir {out}", None,
                              "PPO, score, --least_tried, --mark_tried, revisit reward"),
    # The same without the revisit cost (the mixture's reward): the row above lost held-out wins.
    "ppo_score_least_tried_no_revisit": (("python ppo_textworld.py configs/ppo_hunts_hard.yaml --reward "
                                          "score,win,invalid --output_dir {out}"), None,
                                         "PPO, score, --least_tried, --mark_tried (no revisit reward)"),
    "hunts_easy_ppo_least_tried": played_elsewhere("hunts-hard", "hunts-easy/ppo_score_least_tried",
                                                   "PPO on hunts-easy (--least_tried row), played here"),
    # The same recipe from hunts-easy up: on hunts-hard once 0.8 of the last 32 training episodes are won.
    "ppo_curriculum": ("python ppo_textworld.py configs/ppo_hunts_hard.yaml --train_games 'hunts-easy > hunts-hard' "
                       "--output_dir {out}", None, "the same, curriculum hunts-easy > hunts-hard"),
    **{f"ppo_{estimator}": (critic_free("configs/ppo_hunts_hard.yaml", estimator, HUNTS_HARD_CRITIC_FREE_FLAGS)
                            + " --output_dir {out}", None,
                            f"the same, --advantage_estimator {estimator} --group_size 4, 4 iterations")
       for estimator in ("grpo", "rloo", "gigpo")},
    "ppo_rloo_seed1": (critic_free("configs/ppo_hunts_hard.yaml", "rloo", HUNTS_HARD_CRITIC_FREE_FLAGS)
                       + " --seed 1 --output_dir {out}", None,
                       "the same as rloo, --seed 1"),
    # The PPO rows above end well below their start (0.875): a 4x KL penalty to hold the policy nearer to it.
    "ppo_kl_0.2": ("python ppo_textworld.py configs/ppo_hunts_hard.yaml --kl_coef 0.2 --output_dir {out}", None,
                   "PPO, score, --least_tried, --mark_tried, revisit reward, --kl_coef 0.2"),
})
# cooking-levels without a value head: whole episodes per iteration, cut at 20 turns in training (levels 1-3's
# walkthroughs take 5-12 turns, level 4's 25-50) so that an iteration plays at most 160 turns; evaluation keeps 50.
COOKING_CRITIC_FREE_FLAGS = " --num_iterations 4 --train_max_episode_turns 20"
EXPERIMENTS["cooking-levels"].update({
    "ppo_score_least_tried": ("python ppo_textworld.py configs/ppo_cooking_levels.yaml --output_dir {out}", None,
                              "PPO, score, --least_tried, --mark_tried"),
    # Twice the env steps: as many as the mixture model played in all (a third of them on cooking).
    "ppo_score_least_tried_12_iterations": ("python ppo_textworld.py configs/ppo_cooking_levels.yaml --num_iterations 12 "
                                            "--output_dir {out}", None, "the same, 12 iterations"),
    **{f"ppo_{estimator}": (critic_free("configs/ppo_cooking_levels.yaml", estimator, COOKING_CRITIC_FREE_FLAGS)
                            + " --output_dir {out}", None,
                            f"the same, --advantage_estimator {estimator} --group_size 4, 4 iterations, "
                            "training episodes cut at 20 turns")
       for estimator in ("grpo", "rloo", "gigpo")},
    "ppo_gigpo_seed1": (critic_free("configs/ppo_cooking_levels.yaml", "gigpo", COOKING_CRITIC_FREE_FLAGS)
                        + " --seed 1 --output_dir {out}", None,
                        "the same as gigpo, --seed 1"),
})
# One model for the three kinds (configs/ppo_mixture.yaml, evaluated on hunts-hard as it trains), played on each.
MIXTURE_LABEL = "PPO on the mixture of hunts-easy, hunts-hard and cooking-levels, --least_tried, --mark_tried"
EXPERIMENTS["hunts-hard"]["ppo_mixture"] = ("python ppo_textworld.py configs/ppo_mixture.yaml --output_dir {out}", None,
                                            MIXTURE_LABEL)
for kind in ("hunts-easy", "cooking-levels"):
    EXPERIMENTS[kind]["ppo_mixture"] = played_elsewhere(kind, "hunts-hard/ppo_mixture", MIXTURE_LABEL + ", played here")
# Cooking alone does not learn (the rows above) where the mixture does: the mixture recipe once more, on another seed,
# judged on cooking as it trains.
EXPERIMENTS["cooking-levels"]["ppo_mixture_seed2"] = (
    "python ppo_textworld.py configs/ppo_mixture.yaml --seed 2 --eval_games cooking-levels --eval_episodes 16 "
    "--output_dir {out}", None, "the same recipe, --seed 2, evaluated on cooking-levels")
EXPERIMENTS["hunts-unseen"] = {
    "random": baselines("hunts-unseen")["random"],
    **least_tried_baselines("hunts-unseen"),
    "hunts_easy_ppo_least_tried": played_elsewhere("hunts-unseen", "hunts-easy/ppo_score_least_tried",
                                                   "PPO on hunts-easy (--least_tried row), played here"),
}


def selected(names: list[str]) -> list[tuple[str, str]]:
    """`set` or `set/name` arguments -> [(set, name)], in the table's order; raises SystemExit on an unknown one."""
    chosen = []
    for item in names:
        game_set, _, name = item.partition("/")
        if game_set not in EXPERIMENTS or (name and name not in EXPERIMENTS[game_set]):
            known = ", ".join(f"{s}/{n}" for s in EXPERIMENTS for n in EXPERIMENTS[s])
            sys.exit(f"error: unknown experiment {item!r}; choose a set ({', '.join(EXPERIMENTS)}) or one of {known}")
        chosen += [(game_set, n) for n in EXPERIMENTS[game_set] if not name or n == name]
    return chosen


def run(experiments: list[tuple[str, str]]) -> None:
    for game_set, name in experiments:
        command, after, _ = EXPERIMENTS[game_set][name]
        out = RESULTS_DIR / game_set / name
        if after and not (RESULTS_DIR / game_set / after / RESULT_FILE).exists():
            sys.exit(f"error: {game_set}/{name} starts from {game_set}/{after}: run that one first")
        if (ROOT / out / RESULT_FILE).exists():  # so that a set's run goes on where it stopped
            print(f"[{game_set}/{name}] done already, skipped: move {out} away to run it again", flush=True)
            continue
        if (ROOT / out).exists():
            sys.exit(f"error: {out} holds an unfinished run: move it away to run {game_set}/{name} again")
        command = command.format(out=out)
        print(f"[{game_set}/{name}] {command}", flush=True)
        started = time.time()
        completed = subprocess.run(shlex.split(command), cwd=ROOT)
        if completed.returncode != 0:
            sys.exit(f"error: {game_set}/{name} failed (exit {completed.returncode}): {command}")
        result = {"command": command, "wall_time_s": time.time() - started, "machine": machine_description()}
        (ROOT / out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
        print(f"[{game_set}/{name}] done in {result['wall_time_s'] / 60:.1f} min", flush=True)


def read_row(game_set: str, name: str) -> dict | None:
    """One table row from an experiment's outputs, None when it has not run."""
    out = ROOT / RESULTS_DIR / game_set / name
    if not (out / RESULT_FILE).exists():
        return None
    result = json.loads((out / RESULT_FILE).read_text())
    command, after, label = EXPERIMENTS[game_set][name]
    row = {"set": game_set, "name": name, "method": label, **result, "env_steps": 0, "curve": []}
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
    else:
        state = json.loads((newest_checkpoint(out) / "trainer_state.json").read_text())
        report = state["eval_history"][-1]
        row["env_steps"] = state["env_steps"]
        row["curve"] = [(point["env_steps"], point["normalized_score"]) for point in state["eval_history"]]
    if after:
        base = read_row(game_set, after)
        row["env_steps"] += base["env_steps"]
        row["wall_time_s"] += base["wall_time_s"]
        row["curve"] = [(steps + base["env_steps"], score) for steps, score in row["curve"]]
        row["command"] = f"{base['command']} && {row['command']}"
    row.update({key: report[key] for key in ("normalized_score", "win_rate", "invalid_rate")})
    return row


def wilson_interval(successes: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate: honest at the few dozen episodes an eval set holds, and never outside
    [0, 1] (the normal approximation is, at 0 or 1 wins)."""
    rate = successes / trials
    center = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    return max(0.0, center - half), min(1.0, center + half)


def protocol(game_set: str) -> str:
    """`--num_episodes 12 --max_episode_turns 12` -> `num_episodes=12, max_episode_turns=12`."""
    return ", ".join(f"{flag.removeprefix('--')}={value}" for flag, value in eval_flags(game_set).items())


def markdown(rows: list[dict]) -> str:
    lines = []
    for game_set in EXPERIMENTS:
        chosen = [row for row in rows if row["set"] == game_set]
        if not chosen:
            continue
        lines += [
            f"**{game_set}** games, held-out eval split ({protocol(game_set)})", "",
            "| method | normalized score | win rate [95% interval] | invalid rate | env steps | wall time | machine |",
            "|---|---|---|---|---|---|---|",
        ]
        # Every agent and trainer of a set plays its protocol's episodes (EVAL).
        episodes = int(eval_flags(game_set)["--num_episodes"])
        for row in chosen:
            low, high = wilson_interval(row["win_rate"] * episodes, episodes)
            lines.append(
                f"| {row['method']} | {row['normalized_score']:.3f} | {row['win_rate']:.3f} [{low:.2f}, {high:.2f}] "
                f"| {row['invalid_rate']:.3f} | {row['env_steps']} | {row['wall_time_s'] / 60:.1f} min "
                f"| {row['machine']} |"
            )
        lines += ["", "Commands:", "", "```bash"]
        lines += [row["command"] for row in chosen]
        lines += ["```", ""]
    return "\n".join(lines)


def plot(rows: list[dict], game_set: str, path: Path) -> None:
    chosen = [row for row in rows if row["set"] == game_set]
    trained = [row for row in chosen if row["curve"]]
    if not trained:
        return
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=100)
    for row in trained:
        xs, ys = zip(*row["curve"])
        axes.plot(xs, ys, marker="o", markersize=3, label=row["method"])
    baselines: dict[float, list[str]] = {}  # one line per score: baselines at the same score share their label
    for row in chosen:
        if not row["curve"]:
            baselines.setdefault(row["normalized_score"], []).append(row["method"])
    for score, methods in baselines.items():
        axes.axhline(score, linestyle="--", color="gray", linewidth=1)
        axes.annotate("; ".join(methods), (0, score), textcoords="offset points", xytext=(2, 3), fontsize=7,
                      color="gray", xycoords=("axes fraction", "data"))
    axes.set_xlabel("environment steps (training)")
    axes.set_ylabel("held-out normalized score")
    axes.set_title(f"{game_set} games: held-out eval split", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def table(docs: Path) -> None:
    # Outputs are not kept (ignored by git, often on another machine): an experiment without outputs here keeps the
    # row docs/results.json already holds, so that rerunning one set rebuilds the tables without losing the others.
    earlier = {}
    if (docs / "results.json").exists():
        earlier = {(row["set"], row["name"]): row for row in json.loads((docs / "results.json").read_text())}
    rows = [row for game_set in EXPERIMENTS for name in EXPERIMENTS[game_set]
            if (row := read_row(game_set, name) or earlier.get((game_set, name)))]
    if not rows:
        sys.exit(f"error: no results under {RESULTS_DIR}: run `python tools/results.py run default` first")
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "results.md").write_text(markdown(rows))
    (docs / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    for game_set in EXPERIMENTS:
        plot(rows, game_set, docs / f"curves_{game_set}.png")
    print(markdown(rows))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run experiments: a set (default, hard) or set/name")
    run_parser.add_argument("experiments", nargs="+")
    table_parser = commands.add_parser("table", help="build the tables and plots from the runs so far")
    table_parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where results.md/json and PNGs go")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(selected(args.experiments))
    else:
        table(args.docs)


if __name__ == "__main__":
    main(sys.argv[1:])
