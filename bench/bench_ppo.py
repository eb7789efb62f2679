"""Benchmark of the PPO update on the CPU: achieved FLOP/s against a dense matmul, and peak memory of one iteration.

Launch:
    python bench/bench_ppo.py                                   # SmolLM2-135M, a few minutes on 2 cores
    python bench/bench_ppo.py --iteration_rss false             # the FLOP/s part only (about a minute)

1. Update FLOP/s: forward + backward + AdamW step of PolicyWithValue on one synthetic micro-batch shaped like the
   script's defaults (micro_batch turns of prompt_tokens + response_tokens tokens), with only the last
   trainable_layers_fraction of the layers training, as ppo_textworld.py does. FLOPs are counted by
   torch.utils.flop_counter on one step (so frozen layers count their forward only), time is the median of
   `repeats` timed steps.
2. Dense matmul FLOP/s: an n x n float32 matmul (2 n^3 FLOPs) in the same process: what this CPU can do at best.
3. Peak RSS of one PPO iteration: `ppo_textworld.py --num_iterations 1` run as a child process with the default
   model and games and no evaluation; resource.getrusage(RUSAGE_CHILDREN).ru_maxrss is the largest process's peak.

Prints one JSON line last: update_flops_per_s, matmul_flops_per_s, ratio (goal >= 0.6), peak_rss_gib (goal <= 4).
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.losses import ppo_loss  # noqa: E402
from lib.models import DEFAULT_MODEL, load_model  # noqa: E402
from lib.models import freeze_lower_layers  # noqa: E402
from lib.sequences import pack_sequences  # noqa: E402
from lib.value_head import PolicyWithValue, ValueHead  # noqa: E402

RATIO_GOAL = 0.6
RSS_GOAL_GIB = 4.0


@dataclass
class BenchArguments:
    model_name_or_path: str = field(default=DEFAULT_MODEL, metadata={"help": "Model to benchmark."})
    micro_batch: int = field(default=8, metadata={"help": "Turns per micro-batch (ppo_textworld.py defaults: 8 envs * 8 steps / 2 minibatches / 4 accumulation steps)."})
    prompt_tokens: int = field(default=200, metadata={"help": "Prompt length of every synthetic turn."})
    response_tokens: int = field(default=10, metadata={"help": "Response length of every synthetic turn."})
    trainable_layers_fraction: float = field(default=0.33, metadata={"help": "Last fraction of decoder layers that train."})
    repeats: int = field(default=3, metadata={"help": "Timed update steps (after one warm-up step)."})
    matmul_size: int = field(default=2048, metadata={"help": "n of the n x n reference matmul."})
    iteration_rss: bool = field(default=True, metadata={"help": "Also run one real PPO iteration in a child process for its peak RSS."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: all cores)."})


def matmul_flops_per_s(n: int, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times)


def update_step(model, optimizer, batch) -> None:
    logits, values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["start"], batch["end"])
    mask = batch["response_mask"]
    with torch.no_grad():
        old_logprobs = torch.log_softmax(logits.float(), -1).gather(-1, batch["response_ids"][..., None])[..., 0]
    loss, _ = ppo_loss(
        logits.float(), values.float(), batch["response_ids"], mask, old_logprobs, values.detach().float(),
        torch.randn(mask.shape), torch.randn(mask.shape), clip_range=0.2, clip_range_value=0.2, vf_coef=0.1, ent_coef=0.0,
    )
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def update_flops_per_s(args: BenchArguments) -> dict:
    torch.manual_seed(0)
    policy = load_model(args.model_name_or_path)
    freeze_lower_layers(policy, args.trainable_layers_fraction)
    model = PolicyWithValue(policy, ValueHead(policy.config.hidden_size)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    vocab = policy.config.vocab_size
    prompts = torch.randint(0, vocab, (args.micro_batch, args.prompt_tokens)).tolist()
    responses = torch.randint(0, vocab, (args.micro_batch, args.response_tokens)).tolist()
    batch = pack_sequences(prompts, responses, pad_id=0)
    with FlopCounterMode(display=False) as counter:
        update_step(model, optimizer, batch)
    flops = counter.get_total_flops()
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        update_step(model, optimizer, batch)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "update_flops": flops,
        "update_s": seconds,
        "update_flops_per_s": flops / seconds,
        "update_tokens": args.micro_batch * (args.prompt_tokens + args.response_tokens),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def iteration_peak_rss_gib(args: BenchArguments) -> tuple[float, float]:
    """Peak RSS (GiB) and wall time (s) of one default PPO iteration run as a child process, without evaluation."""
    with tempfile.TemporaryDirectory() as output:
        command = [
            sys.executable, str(ROOT / "ppo_textworld.py"), "--model_name_or_path", args.model_name_or_path,
            "--output_dir", output, "--num_iterations", "1", "--eval_episodes", "0", "--report_to", "none",
            "--progress", "false", "--trainable_layers_fraction", str(args.trainable_layers_fraction),
        ]
        started = time.time()
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"ppo_textworld.py failed:\n{result.stderr[-3000:]}")
        seconds = time.time() - started
    # ru_maxrss is in KiB on Linux: the peak of the largest child (the trainer, not its game workers).
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, seconds


def main() -> None:
    (args,) = HfArgumentParser(BenchArguments).parse_args_into_dataclasses()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    result = {"model": args.model_name_or_path, "threads": torch.get_num_threads()}
    result.update(update_flops_per_s(args))
    result["matmul_flops_per_s"] = matmul_flops_per_s(args.matmul_size)
    result["ratio"] = result["update_flops_per_s"] / result["matmul_flops_per_s"]
    result["ratio_goal"] = RATIO_GOAL
    if args.iteration_rss:
        result["peak_rss_gib"], result["iteration_run_s"] = iteration_peak_rss_gib(args)
        result["rss_goal_gib"] = RSS_GOAL_GIB
    print(json.dumps(result))


if __name__ == "__main__":
    main()
