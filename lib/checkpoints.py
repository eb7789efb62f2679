"""The files a resume reads: checked before anything loads, and written so that loading them can run no code.

A checkpoint's training_state/ is what `accelerator.save_state` wrote. Without DeepSpeed: model.safetensors,
optimizer.bin (tensors and numbers: torch.load(weights_only=True) reads it) and random_states_P.pkl per process
(accelerate reads them with weights_only=True and numpy's arrays allowed). Under DeepSpeed: pytorch_model/, the
engine's own files, which DeepSpeed reads with torch.load(weights_only=False), a full unpickler. Its optimizer files
hold a few objects of DeepSpeed's classes (DEEPSPEED_CLASSES) besides tensors, so they would not load otherwise.
`write_plain_deepspeed_checkpoints` gives the engine a checkpoint engine that stores those objects as tagged plain
data and reads every file with weights_only=True, rebuilding only those classes: then a resume, checked by
`check_training_state`, never unpickles anything but tensors and plain data.
"""

import dataclasses
import enum
import json
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

OPTIMIZER_FILE = "optimizer.bin"
WEIGHTS_FILE = "model.safetensors"
DEEPSPEED_DIR = "pytorch_model"  # accelerate's name for the DeepSpeed engine's folder
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")  # what torch.save writes, by accelerate's and DeepSpeed's names
# Tagged dicts that stand for a DeepSpeed object in a checkpoint: {OBJECT_TAG: class name, "state": its data}.
OBJECT_TAG = "__deepspeed_object__"
# Types torch.load(weights_only=True) reads as they are.
PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from; the message names it."""


def read_json_object(path: Path) -> dict:
    """The JSON object stored in `path`; CheckpointError naming the file when it is missing, empty or not one."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    text = path.read_bytes()
    if not text.strip():
        raise CheckpointError(f"{path} is empty")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (its header read and checked against the file's size, no tensor
    loaded), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            return None
    except (SafetensorError, OSError) as error:
        return " ".join(str(error).split())


def torch_file_problem(path: Path) -> str | None:
    """Why torch.load(weights_only=True) refuses `path` (corrupt, or it holds objects that unpickling would have to
    construct by running code), or None. accelerate's random_states_P.pkl are read as accelerate reads them: with
    numpy's arrays allowed."""
    from accelerate.utils import load

    read = load if path.suffix == ".pkl" else torch.load
    try:
        # mmap: the storages stay on disk, so checking a large optimizer state reads little of it.
        read(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - whatever the unpickler raises, the file cannot be resumed from
        return " ".join(str(error).split("\n")[0].split())
    return None


def check_training_state(folder: Path, world_size: int, deepspeed: bool) -> None:
    """Raise CheckpointError naming the file unless `folder` (a checkpoint's training_state/) holds the weights (and,
    without DeepSpeed, the optimizer state), one random_states_P.pkl per process, and every file loads safely.
    `deepspeed`: whether this launch runs DeepSpeed, whose layout the checkpoint must have."""
    if not folder.is_dir() or not any(folder.iterdir()):
        raise CheckpointError(f"{folder} is empty: the checkpoint was not written completely")
    if (folder / DEEPSPEED_DIR).is_dir() != deepspeed:
        written, launched = ("with", "without") if not deepspeed else ("without", "with")
        raise CheckpointError(f"{folder} was written {written} DeepSpeed and this launch runs {launched} it: resume "
                              "with the launch config of the interrupted run")
    needed = [] if deepspeed else [folder / WEIGHTS_FILE, folder / OPTIMIZER_FILE]
    needed += [folder / f"random_states_{rank}.pkl" for rank in range(world_size)]
    missing = [path.name for path in needed if not path.is_file()]
    if deepspeed and not any((folder / DEEPSPEED_DIR).glob("*.pt")):
        missing.append(f"{DEEPSPEED_DIR}/*.pt")
    if missing:
        raise CheckpointError(f"{folder} lacks {', '.join(missing)}: the checkpoint was not written completely")
    for path in sorted(folder.rglob("*")):
        problem = None
        if path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif path.suffix in TORCH_SUFFIXES:
            problem = torch_file_problem(path)
        if problem is not None:
            raise CheckpointError(f"{path} cannot be loaded safely ({problem})")


def deepspeed_classes() -> dict[str, type]:
    """The DeepSpeed classes whose objects its checkpoints hold, by name: the only ones a checkpoint may rebuild."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return {cls.__name__: cls for cls in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def to_plain_data(value, classes: dict[str, type]):
    """`value` with every object of `classes` replaced by a tagged dict of its data; TypeError for any other
    object that torch.load(weights_only=True) could not read."""
    kind = type(value)
    if kind.__name__ in classes and classes[kind.__name__] is kind:
        if isinstance(value, enum.Enum):
            state = value.value
        elif dataclasses.is_dataclass(value):
            state = dataclasses.asdict(value)
        else:
            state = vars(value)
        return {OBJECT_TAG: kind.__name__, "state": to_plain_data(state, classes)}
    if kind in (dict, OrderedDict):
        return kind((key, to_plain_data(item, classes)) for key, item in value.items())
    if kind in (list, tuple):
        return kind(to_plain_data(item, classes) for item in value)
    if kind in PLAIN_TYPES or isinstance(value, torch.Tensor):
        return value
    raise TypeError(
        f"a DeepSpeed checkpoint holds a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        "cannot read: add its class to lib.checkpoints.deepspeed_classes"
    )


def from_plain_data(value, classes: dict[str, type]):
    """The inverse of to_plain_data: tagged dicts become objects again, of `classes` only."""
    kind = type(value)
    if kind in (dict, OrderedDict) and OBJECT_TAG in value:
        cls, state = classes[value[OBJECT_TAG]], from_plain_data(value["state"], classes)
        if issubclass(cls, enum.Enum):
            return cls(state)
        if dataclasses.is_dataclass(cls):
            return cls(**state)
        rebuilt = cls.__new__(cls)
        rebuilt.__dict__.update(state)
        return rebuilt
    if kind in (dict, OrderedDict):
        return kind((key, from_plain_data(item, classes)) for key, item in value.items())
    if kind in (list, tuple):
        return kind(from_plain_data(item, classes) for item in value)
    return value


def write_plain_deepspeed_checkpoints(engine) -> None:
    """Make a DeepSpeed engine save its checkpoints as plain data (to_plain_data) and read them back with
    torch.load(weights_only=True) (from_plain_data), in place of its default TorchCheckpointEngine."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(
            f"the DeepSpeed config asks for the {type(engine.checkpoint_engine).__name__} checkpoint engine; only the "
            "default one can be made to write checkpoints that load without running code: drop the config's "
            "`checkpoint` engine settings"
        )
    classes = deepspeed_classes()

    class PlainDataCheckpointEngine(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            super().save(to_plain_data(state_dict, classes), path)

        def load(self, path: str, map_location=None):
            return from_plain_data(torch.load(path, map_location=map_location, weights_only=True), classes)

    engine.checkpoint_engine = PlainDataCheckpointEngine(engine._config)
