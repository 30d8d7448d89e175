"""Presets: resolve a handle, then load a KerasHub preset or convert a transformers checkpoint.

Every loader takes ``resolver``: the ``PresetResolver`` that turns the handle into a
directory, whose files the loaders open only through ``lmq.core.presets.files`` (a preset
is a closed world). Without one, built-in names, local directories, ``hf://`` and ``kaggle://``
resolve; a caller that knows more names (the SQL store) passes its own.
"""

from lmq.core.presets.resolver import PresetNotFound, PresetResolver

__all__ = [
    "PresetNotFound",
    "PresetResolver",
    "load_backbone",
    "load_preprocessor",
    "load_task",
    "load_tokenizer",
    "save_task",
]


def _files(preset, resolver):
    return (resolver or PresetResolver()).files(preset)


def _check_fits_here(files, task=True):
    """Refuse, before building, a preset whose declared sizes this machine's memory cannot hold: its
    weights, and for a task one row's KV cache to its sequence length (``generate``'s default length)."""
    from lmq.core.presets.sizes import check_preset_fits, machine_memory_bytes

    check_preset_fits(files, machine_memory_bytes(), "this machine's memory", to_preset_length=task)


def load_task(preset, cls, load_weights=True, dtype=None, resolver=None, **kwargs):
    """The task ``preset`` holds; an adapter preset (``lmq.core.adapters``) gives its base with the
    adapter attached (``base=`` names another base than the one its config names)."""
    from lmq.core import adapters
    from lmq.core.presets import keras_hub_format, transformers_import

    files = _files(preset, resolver)
    if adapters.is_adapter_preset(files):  # its base, with the adapter attached
        resolver = resolver or PresetResolver()
        base = adapters.base_of(files, resolver, kwargs.pop("base", None))
        task = load_task(base, cls, load_weights, dtype, resolver, **kwargs)
        if load_weights:
            adapters.attach(task, adapters.read_adapter(files, task.backbone))
        return task
    _check_fits_here(files)
    if transformers_import.is_transformers_checkpoint(files):
        return transformers_import.load_task(files, cls, load_weights, dtype, **kwargs)
    return keras_hub_format.load_task(files, cls, load_weights, dtype, **kwargs)


def load_backbone(preset, cls, load_weights=True, dtype=None, resolver=None):
    from lmq.core.presets import keras_hub_format, transformers_import

    files = _files(preset, resolver)
    _check_fits_here(files, task=False)
    if transformers_import.is_transformers_checkpoint(files):
        backbone = transformers_import.load_backbone(files, load_weights, dtype)
    else:
        backbone = keras_hub_format.load_backbone(files, load_weights, dtype)
    if not isinstance(backbone, cls):
        raise ValueError(f"Preset {preset!r} holds a {type(backbone).__name__}, not a {cls.__name__}.")
    return backbone


def load_preprocessor(preset, cls, resolver=None, **overrides):
    from lmq.core.presets import keras_hub_format, transformers_import

    files = _files(preset, resolver)
    if transformers_import.is_transformers_checkpoint(files):
        preprocessor = transformers_import.load_preprocessor(files, **overrides)
        if preprocessor is None:
            raise FileNotFoundError(f"Preset {files.name!r} has no tokenizer files.")
    else:
        preprocessor = keras_hub_format.load_preprocessor(files, **overrides)
    if not isinstance(preprocessor, cls):
        raise ValueError(f"Preset {preset!r} holds a {type(preprocessor).__name__}, not a {cls.__name__}.")
    return preprocessor


def load_tokenizer(preset, cls, resolver=None):
    tokenizer = load_preprocessor(preset, cls=object, resolver=resolver).tokenizer
    if not isinstance(tokenizer, cls):
        raise ValueError(f"Preset {preset!r} holds a {type(tokenizer).__name__}, not a {cls.__name__}.")
    return tokenizer


def save_task(task, preset_dir):
    from lmq.core.presets.keras_hub_format import save_task as save

    save(task, preset_dir)
