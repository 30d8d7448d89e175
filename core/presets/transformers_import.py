"""Converting a transformers checkpoint (config.json with ``model_type``, safetensors) on load.

The architecture registered for the ``model_type`` supplies a converter module with
``backbone_config(hf_config) -> dict`` (KerasHub backbone arguments) and
``convert_weights(backbone, checkpoint)`` (and ``backbone_class(hf_config) -> class name`` when
the architecture has more than one backbone class); its tokenizer class reads the checkpoint's
tokenizer files (``from_transformers_checkpoint(directory) -> Tokenizer | None``).
Only safetensors are read; pickle files (``*.bin``) are refused.
"""

import importlib
import json

from safetensors import safe_open

from core.names import DTYPES
from core.plugins import get_registry
from core.presets.keras_hub_format import read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_transformers_checkpoint(directory):
    path = directory / "config.json"
    if not path.is_file():
        return False
    try:
        return "model_type" in json.loads(path.read_text())
    except json.JSONDecodeError:
        return False


class Checkpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time."""

    def __init__(self, directory):
        self.directory = directory
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json(index)["weight_map"]
            self.files = {name: directory / file for name, file in weight_map.items()}
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                pickles = sorted(p.name for p in directory.glob("*.bin"))
                hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
                raise FileNotFoundError(f"No safetensors weights in {directory}{hint}.")
            with safe_open(single, framework="pt") as handle:
                self.files = {name: single for name in handle.keys()}
        self._handles = {}

    def __contains__(self, name):
        return name in self.files

    def read(self, name):
        if name not in self.files:
            raise ValueError(f"Checkpoint {self.directory} has no tensor {name!r}.")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path].get_tensor(name)

    def assign(self, variable, name, transform=None):
        """Copies tensor ``name`` (after ``transform``) into ``variable``, checking its shape."""
        tensor = self.read(name)
        if transform is not None:
            tensor = transform(tensor)
        if tuple(tensor.shape) != tuple(variable.shape):
            raise ValueError(
                f"Checkpoint {self.directory}: tensor {name!r} has shape {tuple(tensor.shape)} "
                f"(after conversion), but the config needs {tuple(variable.shape)}."
            )
        variable.assign(tensor.to(variable.value.dtype))


def _architecture(directory):
    hf_config = read_json(directory / "config.json")
    model_type = hf_config["model_type"]
    architecture = get_registry().for_hf_model_type(model_type, directory)
    if architecture is None or architecture.hf_converter is None:
        raise ValueError(
            f"{directory / 'config.json'}: no registered lmq plugin converts transformers "
            f"model_type {model_type!r}."
        )
    return hf_config, architecture, importlib.import_module(architecture.hf_converter)


def _backbone_class(architecture, converter, hf_config):
    """The architecture's backbone, or the one of its classes the converter names for this layout."""
    if hasattr(converter, "backbone_class"):
        return architecture.load_class(converter.backbone_class(hf_config))
    return architecture.load("backbone")


def checkpoint_dtype(hf_config):
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return dtype if dtype in DTYPES else None


def load_backbone(directory, load_weights=True, dtype=None):
    hf_config, architecture, converter = _architecture(directory)
    config = converter.backbone_config(hf_config)
    config["dtype"] = dtype or checkpoint_dtype(hf_config)
    backbone = _backbone_class(architecture, converter, hf_config)(**config)
    if load_weights:
        converter.convert_weights(backbone, Checkpoint(directory))
    return backbone


def load_task(directory, cls, load_weights=True, dtype=None, preprocessor="auto", **kwargs):
    backbone = load_backbone(directory, load_weights, dtype)
    architecture = get_registry().architecture_of_class(type(backbone).__name__)
    task_cls = architecture.load("task")
    if not issubclass(task_cls, cls):
        raise ValueError(f"Checkpoint {directory} holds a {task_cls.__name__}, not a {cls.__name__}.")
    if isinstance(preprocessor, str) and preprocessor == "auto":
        preprocessor = load_preprocessor(directory)
    return task_cls(backbone=backbone, preprocessor=preprocessor, **kwargs)


def load_preprocessor(directory, **overrides):
    """The architecture's preprocessor around the checkpoint's tokenizer files; None without them."""
    _, architecture, _ = _architecture(directory)
    tokenizer_cls = architecture.load("tokenizer")
    if not hasattr(tokenizer_cls, "from_transformers_checkpoint"):
        raise ValueError(f"{tokenizer_cls.__name__} cannot read a transformers checkpoint's tokenizer files.")
    tokenizer = tokenizer_cls.from_transformers_checkpoint(directory)
    if tokenizer is None:
        return None
    return architecture.load("preprocessor")(tokenizer=tokenizer, **overrides)


def rope_settings(hf_config):
    """(theta, rope type, all rope settings) from ``rope_scaling`` or transformers 5's ``rope_parameters``."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, rope.get("rope_type", rope.get("type", "default")), rope
