"""Preset directories in the KerasHub 0.32 format.

::

    config.json          the backbone               task.json        the task
    preprocessor.json    the preprocessor           tokenizer.json   the tokenizer
    metadata.json        versions, parameter count  model.weights.h5 the backbone's weights
    assets/tokenizer/    vocabulary.spm, or vocabulary.json + merges.txt
    chat_template.jinja  the tokenizer's chat template, if it has one (lmq's; KerasHub ignores it)
    tokenizer_config.json  a transformers checkpoint's `legacy` and rstrip tokens, if it said (lmq's)

Classes named in these files are resolved through the plugin registry.
"""

import datetime
import json
import os
import pathlib
import shutil
import tempfile

import keras

from lmq.core.models.serialization import class_name_of
from lmq.core.plugins import get_registry
from lmq.core.presets.transformers_import import (
    CHAT_TEMPLATE_FILE,
    TOKENIZER_CONFIG_FILE,
    attach_chat_template,
    tokenization_config,
)
from lmq.core.presets.weights import WEIGHTS_FILE, read_weights, write_weights
from lmq.core.quantization import parse_dtype, policy_map

KERAS_HUB_VERSION = "0.32.0"  # the format version lmq writes
TOKENIZER_ASSET_DIR = "assets/tokenizer"


def _read_config(files, relative):
    """(class, config) of the serialized KerasHub object in ``relative``, its class found in the registry."""
    serialized = files.read_json(relative)
    config = serialized.get("config") or {}
    names = (serialized.get("class_name"), serialized.get("registered_name") or "")
    if not all(isinstance(name, str) for name in names) or not isinstance(config, dict):
        raise files.error(relative, "is not a serialized Keras object (a 'class_name' string and a 'config' object)")
    source = f"Preset {files.name!r}, file {relative}"
    return get_registry().find_class(class_name_of(serialized, source), source=source), dict(config)


def _build(files, relative, build, /, **arguments):
    """``build(**arguments)`` from ``relative``'s config; an error names that file."""
    source = f"Preset {files.name!r}, file {relative}"
    try:
        return build(**arguments)
    except (TypeError, ValueError) as error:  # a missing, unknown or refused argument
        raise ValueError(f"{source}: the config does not fit its class: {error}") from None
    except (ArithmeticError, AttributeError, LookupError) as error:  # e.g. zero heads, a list for a number
        raise ValueError(f"{source}: the config does not fit its class ({type(error).__name__})") from None


def load_backbone(files, load_weights=True, dtype=None):
    """``dtype`` (a float dtype) overrides the preset's; an int8 preset stays int8, its scales
    and activations in that dtype."""
    cls, config = _read_config(files, "config.json")
    if dtype:
        if parse_dtype(dtype)[1]:
            raise ValueError(f"dtype {dtype!r} is quantized; pass a float dtype, then call quantize('int8').")
        stored = config.get("dtype")
        if parse_dtype_of(files, stored)[1]:
            dtype = policy_map(list(stored["config"]["policy_map"]), dtype)
        config["dtype"] = dtype
    backbone = _build(files, "config.json", cls.from_config, config=config)
    if load_weights:
        read_weights(backbone, files, WEIGHTS_FILE)
    return backbone


def parse_dtype_of(files, dtype):
    """``parse_dtype`` of a config's dtype; a bad one is an error naming the file."""
    try:
        return parse_dtype(dtype)
    except ValueError as error:
        raise files.error("config.json", str(error)) from None


def load_tokenizer(files):
    """The tokenizer of ``tokenizer.json``; its vocabulary comes from the preset's assets only."""
    cls, config = _read_config(files, "tokenizer.json")
    named = [field for field in cls.asset_fields if isinstance(config.get(field), str)]
    if named:
        only = f"a preset's tokenizer reads only {TOKENIZER_ASSET_DIR}/"
        raise files.error("tokenizer.json", f"{named} name files; {only}")
    tokenizer = _build(files, "tokenizer.json", cls.from_config, config=config)
    tokenizer.load_assets(files.sub(TOKENIZER_ASSET_DIR))
    attach_chat_template(tokenizer, files)
    return tokenizer


def load_preprocessor(files, **overrides):
    cls, config = _read_config(files, "preprocessor.json")
    config.pop("tokenizer", None)  # tokenizer.json + assets are the source of truth
    return _build(files, "preprocessor.json", cls, tokenizer=load_tokenizer(files), **{**config, **overrides})


def task_class(files, backbone, cls):
    """The task class to build: the one task.json names, else the architecture's."""
    registry = get_registry()
    if files.is_file("task.json"):
        found, _ = _read_config(files, "task.json")
    else:
        architecture = registry.architecture_of_class(type(backbone).__name__)
        found = architecture.load("task")
    if not issubclass(found, cls):
        raise ValueError(f"Preset {files.name!r} holds a {found.__name__}, not a {cls.__name__}.")
    return found


def load_task(files, cls, load_weights=True, dtype=None, preprocessor="auto", **kwargs):
    backbone = load_backbone(files, load_weights, dtype)
    task_cls = task_class(files, backbone, cls)
    if isinstance(preprocessor, str) and preprocessor == "auto":
        preprocessor = load_preprocessor(files) if files.is_file("preprocessor.json") else None
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
            if task.preprocessor.tokenizer.chat_template is not None:
                (staging / CHAT_TEMPLATE_FILE).write_text(task.preprocessor.tokenizer.chat_template, encoding="utf-8")
            tokenization = tokenization_config(task.preprocessor.tokenizer)
            if tokenization:
                _write(staging / TOKENIZER_CONFIG_FILE, tokenization)
        write_weights(task.backbone, staging / WEIGHTS_FILE)
        base_task = next(c.__name__ for c in type(task).__mro__ if c.__module__.startswith("lmq.core."))
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
