import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lib.training
import rejection_sampling
from lib.arguments import parse_arguments
from lib.losses import sft_loss
from lib.models import load_model, load_tokenizer
from lib.prompts import PromptConfig, answer_text
from lib.rollout import load_rollouts
from lib.sequences import pack_sequences, response_logits
from lib.selection import returns_to_go, select, top_count

ROOT = Path(__file__).resolve().parents[1]


# ---- selection


def test_top_percent_ranks_best_first_and_rounds_up():
    values = [0.5, 2.0, -1.0, 1.0, 0.0]
    chosen = select(values, keep_top_percent=40)
    assert chosen.ranks == [3, 1, 5, 2, 4]
    assert chosen.kept == [False, True, False, True, False] and chosen.note is None
    assert select(values, keep_top_percent=30).num_kept == 2  # 1.5 candidates -> 2
    assert select(values, keep_top_percent=0.1).num_kept == 1  # any positive share keeps one
    assert select(values, keep_top_percent=100).kept == [True] * 5
    assert top_count(10, 30) == 3 and top_count(11, 100 / 11) == 1  # 1.0000000000000002 in floats: still 1


def test_top_n_and_min_return():
    values = [0.5, 2.0, -1.0, 1.0, 0.0]
    assert select(values, keep_top_n=2).kept == [False, True, False, True, False]
    assert select(values, min_return=0.0).kept == [True, True, False, True, False]  # strictly above
    assert select(values, keep_top_n=3, min_return=0.7).kept == [False, True, False, True, False]


def test_ties_go_to_the_earlier_candidate_every_time():
    values = [1.0, 3.0, 1.0, 3.0, 1.0]
    chosen = select(values, keep_top_n=3)
    assert chosen.ranks == [3, 1, 4, 2, 5]
    assert chosen.kept == [True, True, False, True, False]
    assert select(list(values), keep_top_n=3) == chosen
    assert select(values, keep_top_percent=60) == chosen
    assert select([0.3, 0.1 + 0.2], keep_top_n=1).kept == [True, False]  # float noise is no reason to reorder


def test_asking_for_more_than_exists_keeps_all_and_says_so():
    chosen = select([1.0, 2.0], keep_top_n=5)
    assert chosen.kept == [True, True]
    assert "top 5" in chosen.note and "only 2 candidates" in chosen.note
    assert select([1.0, 2.0], keep_top_n=2).note is None


def test_no_candidates_and_none_above_the_threshold():
    for rule in ({"keep_top_percent": 50}, {"keep_top_n": 3}, {"min_return": 0.0}):
        chosen = select([], **rule)
        assert chosen.ranks == [] and chosen.kept == [] and chosen.num_kept == 0
    assert select([-1.0, -2.0], min_return=0.0).num_kept == 0


def test_select_refuses_two_top_rules_or_none():
    with pytest.raises(ValueError, match="exclude each other"):
        select([1.0], keep_top_percent=10, keep_top_n=1)
    with pytest.raises(ValueError, match="no keep rule"):
        select([1.0])


def test_returns_to_go():
    assert returns_to_go([1.0, 0.0, 2.0], 0.5) == [1.5, 1.0, 2.0]
    assert returns_to_go([1.0, 0.0, 2.0], 1.0) == [3.0, 2.0, 2.0]
    assert returns_to_go([], 0.9) == []


@pytest.mark.parametrize(
    "rank_by, objectives, ranks, kept, candidate_ranks",
    [
        # Returns 1.0 and 0.6, KL sums 1.2 and 0.2: 1.0 - 0.5 * 1.2 = 0.4 < 0.6 - 0.5 * 0.2 = 0.5.
        ("episode", [0.4, 0.4, 0.5, 0.5], [2, 2, 1, 1], [False, False, True, True], [2, 1]),
        # Returns-to-go (gamma 0.5) 0.5, 1.0, 0.5, 0.2 minus 0.5 * each turn's KL.
        ("turn", [0.25, 0.65, 0.45, 0.15], [3, 1, 2, 4], [False, True, True, False], [3, 1, 2, 4]),
    ],
)
def test_rank_turns_ranks_by_return_minus_rank_kl_coef_times_kl(rank_by, objectives, ranks, kept, candidate_ranks):
    """The objective ranked (and written into every turn) is the candidate's return minus rank_kl_coef times its KL
    (an episode: the sum over its turns); here the KL term changes which candidates are kept."""
    def played_turns():
        rows = [(0, 0, 0.0, 0.5), (0, 1, 1.0, 0.7), (1, 0, 0.4, 0.1), (1, 1, 0.2, 0.1)]  # episode, turn, reward, kl
        return [{"episode": e, "turn": t, "reward": r, "kl": kl, "won": False} for e, t, r, kl in rows]

    def ranked(rank_kl_coef):
        turns = played_turns()
        arguments = rejection_sampling.SelectionArguments(rank_by=rank_by, gamma=0.5, keep_top_percent=50,
                                                          rank_kl_coef=rank_kl_coef)
        return turns, *rejection_sampling.rank_turns(turns, arguments)

    turns, chosen, episode_returns = ranked(0.5)
    assert episode_returns == pytest.approx([1.0, 0.6])
    assert [turn["objective"] for turn in turns] == pytest.approx(objectives)
    assert [turn["rank"] for turn in turns] == ranks and [turn["kept"] for turn in turns] == kept
    assert chosen.ranks == candidate_ranks and chosen.num_kept == len(candidate_ranks) // 2
    assert [turn["kept"] for turn in ranked(0.0)[0]] != kept


# ---- the fine-tuning loss


def test_sft_loss_prompt_tokens_get_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool)  # prompt, answer, padding
    loss, stats = sft_loss(logits, labels, mask)
    loss.backward()
    assert logits.grad[~mask].abs().sum() == 0  # a prompt (or padding) position contributes nothing
    assert (logits.grad[mask].abs().sum(dim=-1) > 0).all()  # every answer token does
    changed = labels.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 11
    assert torch.equal(sft_loss(logits, changed, mask)[0], loss)
    expected = -torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0][mask].mean()
    assert torch.allclose(loss, expected) and torch.allclose(stats["nll"], expected)
    assert stats["kl"] == 0


def test_sft_loss_kl_term_vanishes_at_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 7)
    labels = torch.randint(0, 7, (1, 3))
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain, _ = sft_loss(logits, labels, mask)
    same, stats = sft_loss(logits, labels, mask, logits.clone(), kl_coef=0.5)
    assert torch.allclose(same, plain) and stats["kl"].abs() < 1e-6
    moved, stats = sft_loss(logits, labels, mask, torch.randn(1, 3, 7), kl_coef=0.5)
    assert stats["kl"] > 0 and torch.allclose(moved, plain + 0.5 * stats["kl"])


def test_packed_answer_loss_equals_the_model_loss_with_the_prompt_labelled_minus_100(tiny_model_path):
    """The script's path (prompt + answer packed, logits at the answer positions only) learns exactly the answer
    tokens: the same loss as Hugging Face's with every prompt label -100, and no gradient from prompt logits."""
    model = load_model(tiny_model_path)
    tokenizer = load_tokenizer(tiny_model_path)
    prompts = [[10, 11, 12, 13, 14], [15, 16]]
    answers = [[20, 21], [22, 23, 24]]
    packed = pack_sequences(prompts, answers, tokenizer.pad_token_id)
    logits = response_logits(model, packed["input_ids"], packed["attention_mask"], packed["position_ids"],
                             packed["start"], packed["end"])
    loss, _ = sft_loss(logits, packed["response_ids"], packed["response_mask"])
    total = 0.0
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        total = total + model(input_ids=ids, labels=labels).loss * len(answer)
    assert torch.allclose(loss, total / sum(map(len, answers)), atol=1e-5)


def test_answer_text_ends_like_a_reply(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path)
    assert answer_text("take coin", PromptConfig(format="chat"), tokenizer) == "take coin" + tokenizer.eos_token
    assert answer_text("take coin", PromptConfig(format="plain"), tokenizer) == "take coin\n"


# ---- flags


BAD_FLAGS = [
    (["--context", "episode"], "--context episode"),
    (["--keep_top_percent", "10", "--keep_top_n", "3"], "--keep_top_percent and --keep_top_n"),
    (["--keep_top_percent", "0"], "--keep_top_percent"),
    (["--keep_top_percent", "150"], "--keep_top_percent"),
    (["--keep_top_n", "0"], "--keep_top_n"),
    (["--learning_rate=-1e-5"], "--learning_rate"),
    (["--num_rounds", "0"], "--num_rounds"),
    (["--rank_by", "game"], "--rank_by"),
    (["--gamma", "1.5"], "--gamma"),
    (["--kl_coef=-0.1"], "--kl_coef"),
    (["--rank_kl_coef=-1"], "--rank_kl_coef"),
    (["--kl_direction", "sideways"], "--kl_direction"),
    (["--train_batch_size", "6", "--gradient_accumulation_steps", "4"], "--train_batch_size"),
    (["--temperature", "0"], "temperature"),
    (["--reward", "score,bonus"], "--reward"),
    (["--report_to", "comet"], "--report_to"),
    (["--eval_games", "/no/such/games"], "--eval_games"),
    (["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint"),
    (["--action_mode", "beam"], "--action_mode"),
    (["--train_games", "tiny > default"], "curriculum stages"),
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_flags_fail_before_any_model_loads(flags, named, tmp_path, monkeypatch):
    for loader in ("load_model", "load_tokenizer"):
        monkeypatch.setattr(lib.training, loader, lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        rejection_sampling.main(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and named in message and "\n" not in message


def test_keep_rule_defaults_to_a_top_percent_only_when_none_is_given():
    selection = parse_arguments(rejection_sampling.ALL_ARGUMENTS, [])[1]
    assert selection.keep_top_percent == rejection_sampling.DEFAULT_KEEP_TOP_PERCENT
    for flags in (["--keep_top_n", "3"], ["--min_return", "0"]):
        assert parse_arguments(rejection_sampling.ALL_ARGUMENTS, flags)[1].keep_top_percent is None


def test_config_file_is_read_and_an_earlier_run_is_kept(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nkeep_top_percent: 10\nkeep_top_n: 2\n")
    with pytest.raises(SystemExit, match="--keep_top_percent and --keep_top_n"):
        rejection_sampling.main([str(config)])
    with pytest.raises(SystemExit, match="config file not found: .*missing.yaml"):
        rejection_sampling.main([str(tmp_path / "missing.yaml")])
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest.*--overwrite_output_dir"):
        rejection_sampling.main(["--output_dir", str(tmp_path), "--report_to", "none"])


# ---- end to end on the tiny model and games


def run_script(args, launcher=(sys.executable,), timeout=300):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [*launcher, "rejection_sampling.py", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def tiny_args(tiny_model_path, tiny_games, output_dir, **overrides):
    flags = {
        "model_name_or_path": tiny_model_path, "train_games": ",".join(tiny_games), "eval_games": ",".join(tiny_games),
        "output_dir": str(output_dir), "episodes_per_round": 4, "num_envs": 2, "max_episode_turns": 3,
        "eval_episodes": 2, "max_new_tokens": 4, "train_batch_size": 4, "learning_rate": 1e-3,
        "trainable_layers_fraction": 0.5, "progress": False, "report_to": "none", "action_mode": "generate",
        **overrides,
    }
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def round_rows(dataset, round_):
    return [row for row in dataset if row["round"] == round_]


@pytest.fixture(scope="module")
def two_rounds(tiny_model_path, tiny_games, tmp_path_factory):
    """2 rounds, one process: single turns by return-to-go, top half kept, both KL terms on."""
    output = tmp_path_factory.mktemp("rs") / "out"
    log = run_script(tiny_args(
        tiny_model_path, tiny_games, output, num_rounds=2, rank_by="turn", keep_top_percent=50, kl_coef=0.1,
        rank_kl_coef=0.1, report_to="tensorboard",
    ))
    return output, log


def test_two_rounds_single_process(two_rounds, tiny_model_path, tiny_games):
    output, log = two_rounds
    assert "before training" in log and "round 2:" in log
    for round_ in (1, 2):
        checkpoint = output / "checkpoints" / f"checkpoint-{round_}"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["round"] == round_
        assert (checkpoint / "model.safetensors").exists() and (checkpoint / "training_state").is_dir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "training_args.json"):
        assert (output / name).exists(), name
    assert "| round 2 |" in (output / "README.md").read_text()
    assert list((output / "runs").rglob("events.out.tfevents*"))

    dataset = load_rollouts(output, prefix="round")
    for column in ("round", "game", "episode", "turn", "prompt", "command", "return", "rank", "kept"):
        assert column in dataset.column_names, column
    for round_ in (1, 2):
        rows = round_rows(dataset, round_)
        assert sorted(row["rank"] for row in rows) == list(range(1, len(rows) + 1))
        assert sum(row["kept"] for row in rows) == math.ceil(len(rows) / 2)
        kept = [row["objective"] for row in rows if row["kept"]]
        assert min(kept) >= max(row["objective"] for row in rows if not row["kept"])
        assert sorted({row["episode"] for row in rows}) == [0, 1, 2, 3]
    # The reference is the starting policy: no KL before the first fine-tuning, some after it.
    assert max(row["kl"] for row in round_rows(dataset, 1)) < 1e-6
    assert min(row["kl"] for row in round_rows(dataset, 2)) > 0

    # Only the trainable top moved.
    start = load_model(tiny_model_path).state_dict()
    trained = load_model(str(output)).state_dict()
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(trained["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])


def test_resume_continues_at_the_next_round_and_a_round_keeping_nothing_is_skipped(
    two_rounds, tiny_model_path, tiny_games, tmp_path
):
    output = tmp_path / "out"
    shutil.copytree(two_rounds[0], output)
    log = run_script(tiny_args(
        tiny_model_path, tiny_games, output, num_rounds=3, rank_by="turn", keep_top_percent=50, min_return=1000,
        resume_from_checkpoint="latest",
    ))
    assert "at round 2" in log and "round 3: kept none of" in log
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((output / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())["round"] == 3
    dataset = load_rollouts(output, prefix="round")
    assert sorted(set(dataset["round"])) == [1, 2, 3]
    assert not any(row["kept"] for row in round_rows(dataset, 3))
    before = load_file(output / "checkpoints" / "checkpoint-2" / "model.safetensors")
    after = load_file(output / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing kept, nothing learned


def test_score_mode_plays_admissible_commands_and_trains_on_them(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "out"
    log = run_script(tiny_args(tiny_model_path, tiny_games, output, num_rounds=1, action_mode="score",
                               max_candidates=3, length_normalize=True, temperature=4, max_episode_turns=6,
                               train_max_episode_turns=2))
    assert "before training: normalized score" in log and "round 1:" in log
    dataset = load_rollouts(output, prefix="round")
    # ScoringAgent answers with the chosen command itself, which is also the fine-tuning target.
    assert dataset.num_rows > 0 and dataset["response"] == dataset["command"]
    assert set(dataset["command"]) <= {"examine coin", "inventory", "take coin"}  # the tiny games' candidates
    assert max(dataset["turn"]) == 2  # sampled episodes end by --train_max_episode_turns, not --max_episode_turns 6
    assert (output / "model.safetensors").exists()


def test_two_process_deepspeed_zero2_on_cpu(tiny_model_path, tiny_games, tmp_path):
    output = tmp_path / "out"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero2.yaml")
    log = run_script(
        tiny_args(tiny_model_path, tiny_games, output, num_rounds=2, keep_top_n=100, gradient_accumulation_steps=2),
        launcher, timeout=400,
    )
    assert "round 1: asked for the top 100 but there are only 4 candidates: keeping all of them" in log
    dataset = load_rollouts(output, prefix="round")
    assert sorted(set(dataset["process"])) == [0, 1] and all(dataset["kept"])
    assert sorted(set(dataset["game"])) == sorted(tiny_games)  # each process played its own game
    for round_ in (1, 2):
        assert sorted({row["rank"] for row in round_rows(dataset, round_)}) == [1, 2, 3, 4]  # episodes ranked together
    start = load_model(tiny_model_path).state_dict()
    trained = load_model(str(output / "checkpoints" / "checkpoint-2")).state_dict()
    assert not torch.equal(trained["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])
