"""Shared fixtures: a tiny random-weight Llama with the real SmolLM2 tokenizer, and a few tiny generated games.

Both are built once and kept in pytest's cache folder (.pytest_cache, ignored by git), so only the first run pays
for the GGUF tokenizer conversion and the game compilation.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Helper modules whose asserts the tests rely on: pytest explains their failures as it does a test module's.
pytest.register_assert_rewrite("trainer_runs")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def build_tiny_model(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.models import DEFAULT_MODEL, load_tokenizer

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_path(request) -> str:
    """A folder holding a 2-layer, hidden-64 Llama with random weights and the SmolLM2 tokenizer."""
    folder = Path(request.config.cache.mkdir("tiny-llama-v1"))
    if not (folder / "model.safetensors").exists():
        build_tiny_model(folder)
    return str(folder)


@pytest.fixture(scope="session")
def games_cache(request) -> Path:
    return Path(request.config.cache.mkdir("games"))


@pytest.fixture(scope="session")
def tiny_games(games_cache) -> list[str]:
    """Two one-room coin-collector games (train split of the `tiny` set)."""
    from lib.games import resolve_games

    return resolve_games("tiny", "train", games_cache, progress=False)


@pytest.fixture(scope="session")
def small_games(games_cache) -> list[str]:
    """Two coin-collector level-2 and two treasure-hunter level-1 games: a few rooms, walkthroughs of a few steps."""
    from lib.games import resolve_games

    return resolve_games("tw-coin_collector:level=2:n=2,tw-treasure_hunter:level=1:n=2", "train", games_cache, progress=False)


def write_loadable_training_state(folder: Path) -> None:
    """The smallest training_state/ a resume accepts (lib.checkpoints.check_training_state, one process, no
    DeepSpeed): weights, optimizer state and RNG states that load with weights_only=True."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.zeros(2)}, folder / "model.safetensors")
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.bin")
    torch.save({"step": 0}, folder / "random_states_0.pkl")
