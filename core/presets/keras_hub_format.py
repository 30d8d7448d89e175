"""Preset directories in the KerasHub 0.32 format.

::

    config.json          the backbone               task.json        the task
    preprocessor.json    the preprocessor           tokenizer.json   the tokenizer
    metadata.json        versions, parameter count  model.weights.h5 the backbone's weights
    assets/tokenizer/    vocabulary.spm, or vocabulary.json + merges.txt

Classes named in these files are resolved through the plugin registry.
"""

import datetime
import json
import os
import pathlib
import shutil
import tempfile

import keras

from core.models.serialization import class_name_of, deserialize
from core.plugins import get_registry
from core.presets.weights import WEIGHTS_FILE, read_weights, write_weights

KERAS_HUB_VERSION = "0.32.0"  # the format version lmq writes
TOKENIZER_ASSET_DIR = "assets/tokenizer"


def read_json(path):
    if not path.is_file():
        raise FileNotFoundError(f"Preset file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def load_backbone(directory, load_weights=True, dtype=None):
    path = directory / "config.json"
    serialized = read_json(path)
    cls = get_registry().find_class(class_name_of(serialized, path), source=str(path))
    config = {**(serialized.get("config") or {}), **({"dtype": dtype} if dtype else {})}
    try:
        backbone = cls.from_config(config)
    except (TypeError, ValueError) as error:  # a missing, unknown or refused argument
        raise ValueError(f"{path}: the config does not fit its class: {error}") from None
    if load_weights:
        read_weights(backbone, directory / WEIGHTS_FILE)
    return backbone


def load_tokenizer(directory):
    path = directory / "tokenizer.json"
    tokenizer = deserialize(read_json(path), source=str(path))
    assets = directory / TOKENIZER_ASSET_DIR
    if not assets.is_dir():
        raise FileNotFoundError(f"Preset tokenizer assets not found: {assets}")
    tokenizer.load_assets(assets)
    return tokenizer


def load_preprocessor(directory, **overrides):
    path = directory / "preprocessor.json"
    serialized = read_json(path)
    cls = get_registry().find_class(class_name_of(serialized, path), source=str(path))
    config = dict(serialized.get("config") or {})
    config.pop("tokenizer", None)  # tokenizer.json + assets are the source of truth
    return cls(tokenizer=load_tokenizer(directory), **{**config, **overrides})


def task_class(directory, backbone, cls):
    """The task class to build: the one task.json names, else the architecture's."""
    registry = get_registry()
    path = directory / "task.json"
    if path.is_file():
        found = registry.find_class(class_name_of(read_json(path), path), source=str(path))
    else:
        architecture = registry.architecture_of_class(type(backbone).__name__)
        found = architecture.load("task")
    if not issubclass(found, cls):
        raise ValueError(f"Preset {directory} holds a {found.__name__}, not a {cls.__name__}.")
    return found


def load_task(directory, cls, load_weights=True, dtype=None, preprocessor="auto", **kwargs):
    backbone = load_backbone(directory, load_weights, dtype)
    task_cls = task_class(directory, backbone, cls)
    if isinstance(preprocessor, str) and preprocessor == "auto":
        has_preprocessor = (directory / "preprocessor.json").is_file()
        preprocessor = load_preprocessor(directory) if has_preprocessor else None
    return task_cls(backbone=backbone, preprocessor=preprocessor, **kwargs)


def save_task(task, preset_dir):
    """Writes every file into a fresh temporary directory, then moves them in place."""
    preset_dir = pathlib.Path(preset_dir)
    preset_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{preset_dir.name}.", dir=preset_dir.parent))
    try:
        _write(staging / "config.json", task.backbone.serialize())
        _write(staging / "task.json", task.serialize())
        if task.preprocessor is not None:
            _write(staging / "preprocessor.json", task.preprocessor.serialize())
            _write(staging / "tokenizer.json", task.preprocessor.tokenizer.serialize())
            assets = staging / TOKENIZER_ASSET_DIR
            assets.mkdir(parents=True)
            task.preprocessor.tokenizer.save_assets(assets)
        write_weights(task.backbone, staging / WEIGHTS_FILE)
        base_task = next(c.__name__ for c in type(task).__mro__ if c.__module__.startswith("core."))
        _write(
            staging / "metadata.json",
            {
                "keras_version": keras.__version__,
                "keras_hub_version": KERAS_HUB_VERSION,
                "parameter_count": task.backbone.count_params(),
                "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
                "tasks": [base_task],
            },
        )
        preset_dir.mkdir(exist_ok=True)
        for item in sorted(staging.rglob("*")):
            target = preset_dir / item.relative_to(staging)
            if item.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(path, data):
    path.write_text(json.dumps(data, indent=4))
