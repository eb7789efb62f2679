"""Push the saved outputs of a finished run to the Hugging Face Hub, as the run's own --push_to_hub would have: the
command a run prints when its upload failed.

    python tools/push_to_hub.py outputs/ppo me/ppo-textworld       # a trainer's output: the model, then its rollouts
    python tools/push_to_hub.py outputs/eval me/eval-transcripts   # play.py's output: its transcripts

Log in first (`hf auth login` or HF_TOKEN).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.hub import HubError, check_push_access
from lib.rollout import ROLLOUTS_DIR, load_rollouts
from lib.training import push_to_hub

TRANSCRIPTS_DIR = "transcripts"  # play.py's


def rollouts_prefix(output_dir: Path) -> str:
    """`round` for rejection sampling's rollouts, `iteration` for PPO's."""
    return "round" if any((output_dir / ROLLOUTS_DIR).glob("round-*")) else "iteration"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="the run's --output_dir")
    parser.add_argument("repo_id", help="the Hub repo to push to (the run's --push_to_hub)")
    args = parser.parse_args(argv)
    from datasets import load_from_disk

    try:
        check_push_access(args.repo_id)
    except HubError as error:
        print(f"error: {args.repo_id}: {error}", file=sys.stderr)
        return 1
    if (args.output_dir / TRANSCRIPTS_DIR).is_dir():
        load_from_disk(str(args.output_dir / TRANSCRIPTS_DIR)).push_to_hub(args.repo_id)
    elif (args.output_dir / "config.json").is_file():
        push_to_hub(args.repo_id, args.output_dir, load_rollouts(args.output_dir, rollouts_prefix(args.output_dir)))
    else:
        print(f"error: {args.output_dir} holds neither play.py's {TRANSCRIPTS_DIR}/ nor a trained model (config.json)",
              file=sys.stderr)
        return 1
    print(f"pushed {args.output_dir} to {args.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
