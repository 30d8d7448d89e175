"""Converting a transformers checkpoint (config.json with ``model_type``, safetensors) on load.

The architecture registered for the ``model_type`` supplies a converter module with
``backbone_config(hf_config) -> dict`` (KerasHub backbone arguments) and
``convert_weights(backbone, checkpoint)`` (and ``backbone_class(hf_config) -> class name`` when
the architecture has more than one backbone class); its tokenizer class reads the checkpoint's
tokenizer files (``from_transformers_checkpoint(directory) -> Tokenizer | None``), and
``attach_chat_template`` gives it the checkpoint's chat template (KerasHub presets too).
Only safetensors are read; pickle files (``*.bin``) are refused.
"""

import importlib

import keras
from safetensors import SafetensorError, safe_open

from lmq.core.chat_templates import CHAT_TEMPLATE_FILE, builtin_template_name, read_builtin_template
from lmq.core.names import DTYPES
from lmq.core.plugins import get_registry
from lmq.core.presets.files import PresetFileError, PresetFileMissing
from lmq.core.presets.weights import dtype_fits

SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def is_transformers_checkpoint(files):
    if not files.is_file("config.json"):
        return False
    try:
        return "model_type" in files.read_json("config.json")
    except PresetFileError:  # not JSON, or not an object: the KerasHub loader names the problem
        return False


class Checkpoint:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time; every
    shard the index names is a file of the preset (``PresetFiles``, see core.presets.files)."""

    def __init__(self, files):
        self.preset = files
        if files.is_file(SAFETENSORS_INDEX):
            weight_map = files.read_json(SAFETENSORS_INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise files.error(SAFETENSORS_INDEX, "needs a 'weight_map' object of tensor -> file")
            self.files = {name: files.file(file) for name, file in weight_map.items()}
            self._names = {path: file for file, path in zip(weight_map.values(), self.files.values())}
        else:
            if not files.is_file("model.safetensors"):
                pickles = sorted(p.name for p in files.directory.glob("*.bin"))
                hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
                raise files.error("model.safetensors", f"not found; no safetensors weights{hint}", PresetFileMissing)
            single = files.file("model.safetensors")
            self._names = {single: "model.safetensors"}
            self.files = {name: single for name in self._open(single).keys()}
        self._handles = {}

    def _open(self, path):
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError):  # its messages can quote the file's header
            raise self.preset.error(self._names[path], "is not a readable safetensors file") from None

    def __contains__(self, name):
        return name in self.files

    def read(self, name):
        if name not in self.files:
            raise ValueError(f"Preset {self.preset.name!r}: the checkpoint has no tensor {name!r}.")
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(name)
        except SafetensorError:
            raise self.preset.error(self._names[path], f"tensor {name!r} cannot be read") from None

    def assign(self, variable, name, transform=None):
        """Copies tensor ``name`` (after ``transform``) into ``variable``, checking its shape and dtype."""
        tensor = self.read(name)
        stored = keras.backend.standardize_dtype(tensor.dtype)
        if not dtype_fits(stored, variable.dtype):
            problem = f"tensor {name!r} holds {stored} data, but the layer is {variable.dtype}."
            raise self.preset.error(self._names[self.files[name]], problem)
        if transform is not None:
            tensor = transform(tensor)
        if tuple(tensor.shape) != tuple(variable.shape):
            raise ValueError(
                f"Preset {self.preset.name!r}: tensor {name!r} has shape {tuple(tensor.shape)} "
                f"(after conversion), but the config needs {tuple(variable.shape)}."
            )
        variable.assign(tensor.to(variable.value.dtype))


def _architecture(files):
    hf_config = files.read_json("config.json")
    model_type = hf_config["model_type"]
    registry = get_registry()
    architecture = registry.for_hf_model_type(model_type, files.directory) if isinstance(model_type, str) else None
    if architecture is None or architecture.hf_converter is None:
        raise files.error("config.json", f"no registered lmq plugin converts transformers model_type {model_type!r}.")
    return hf_config, architecture, importlib.import_module(architecture.hf_converter)


def _backbone_class(architecture, converter, hf_config):
    """The architecture's backbone, or the one of its classes the converter names for this layout."""
    if hasattr(converter, "backbone_class"):
        return architecture.load_class(converter.backbone_class(hf_config))
    return architecture.load("backbone")


def checkpoint_dtype(hf_config):
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return dtype if dtype in DTYPES else None


def load_backbone(files, load_weights=True, dtype=None):
    hf_config, architecture, converter = _architecture(files)
    try:
        config = converter.backbone_config(hf_config)
        config["dtype"] = dtype or checkpoint_dtype(hf_config)
        backbone = _backbone_class(architecture, converter, hf_config)(**config)
    except (TypeError, ValueError) as error:  # a refused setting, named by the converter or the backbone
        raise files.error("config.json", f"does not describe a model lmq can build: {error}") from None
    except KeyError as error:  # the key is the converter's, not the file's
        raise files.error("config.json", f"lacks the setting {error.args[0]!r}") from None
    except (ArithmeticError, AttributeError, LookupError) as error:  # a setting zero or of the wrong type
        raise files.error("config.json", f"does not describe a model lmq can build ({type(error).__name__})") from None
    if load_weights:
        converter.convert_weights(backbone, Checkpoint(files))
    return backbone


def load_task(files, cls, load_weights=True, dtype=None, preprocessor="auto", **kwargs):
    backbone = load_backbone(files, load_weights, dtype)
    architecture = get_registry().architecture_of_class(type(backbone).__name__)
    task_cls = architecture.load("task")
    if not issubclass(task_cls, cls):
        raise ValueError(f"Preset {files.name!r} holds a {task_cls.__name__}, not a {cls.__name__}.")
    if isinstance(preprocessor, str) and preprocessor == "auto":
        preprocessor = load_preprocessor(files)
    return task_cls(backbone=backbone, preprocessor=preprocessor, **kwargs)


def load_preprocessor(files, **overrides):
    """The architecture's preprocessor around the checkpoint's tokenizer files; None without them."""
    _, architecture, _ = _architecture(files)
    tokenizer_cls = architecture.load("tokenizer")
    if not hasattr(tokenizer_cls, "from_transformers_checkpoint"):
        raise ValueError(f"{tokenizer_cls.__name__} cannot read a transformers checkpoint's tokenizer files.")
    tokenizer = tokenizer_cls.from_transformers_checkpoint(files)
    if tokenizer is None:
        return None
    attach_chat_template(tokenizer, files)
    return architecture.load("preprocessor")(tokenizer=tokenizer, **overrides)


def attach_chat_template(tokenizer, files):
    """Sets ``tokenizer.chat_template`` and ``chat_template_source`` from the preset: its
    ``chat_template.jinja`` (transformers' file, and the one lmq saves into KerasHub presets), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: "default" is used),
    else lmq's built-in template when the handle is a built-in instruct preset. A template that
    cannot be read leaves none, with the reason in ``chat_template_source``: a preset without a
    usable template still generates from plain prompts."""
    template, source = _chat_template(files)
    if template is None:
        builtin = builtin_template_name(files.name)
        if builtin is not None:
            template, source = read_builtin_template(builtin), f"lmq's built-in template {builtin}"
    tokenizer.chat_template = template
    tokenizer.chat_template_source = f"preset {files.name!r}: {source}"
    tokenizer.checkpoint_tokenization = _tokenization(files)


def _tokenization(files):
    """What ``tokenizer_config.json`` says of how transformers reads special tokens in text: its
    ``legacy`` (SentencePiece's "▁" after each one), and the tokens its ``added_tokens_decoder``
    marks ``rstrip``; nothing where the preset has no such file."""
    try:
        config = files.read_json(TOKENIZER_CONFIG_FILE) if files.is_file(TOKENIZER_CONFIG_FILE) else {}
    except PresetFileError:
        return {}
    config = config if isinstance(config, dict) else {}
    settings = {"legacy": config["legacy"]} if isinstance(config.get("legacy"), bool) else {}
    added = config.get("added_tokens_decoder")
    if isinstance(added, dict):
        tokens = [token for token in added.values() if isinstance(token, dict)]
        settings["rstrip"] = tuple(str(t.get("content")) for t in tokens if t.get("rstrip") is True)
    return settings


def tokenization_config(tokenizer):
    """The ``tokenizer_config.json`` that keeps a checkpoint's ``checkpoint_tokenization`` in a
    preset lmq saves (``_tokenization`` reads it back); empty when the checkpoint said nothing."""
    settings = tokenizer.checkpoint_tokenization
    config = {"legacy": settings["legacy"]} if "legacy" in settings else {}
    if "rstrip" in settings:
        rstrip = {token: tokenizer.token_to_id(token) for token in settings["rstrip"]}
        config["added_tokens_decoder"] = {
            str(token_id): {"content": token, "rstrip": True} for token, token_id in rstrip.items() if token_id is not None
        }
    return config


def _chat_template(files):
    """(template or None, the file it came from or why there is none) from the preset's own files."""
    try:
        if files.is_file(CHAT_TEMPLATE_FILE):
            return files.read_text(CHAT_TEMPLATE_FILE), CHAT_TEMPLATE_FILE
        config = files.read_json(TOKENIZER_CONFIG_FILE) if files.is_file(TOKENIZER_CONFIG_FILE) else {}
    except PresetFileError as error:
        return None, f"its chat template cannot be read ({error})"
    field = "tokenizer_config.json 'chat_template'"
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}], as transformers writes several
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            return None, f"{field} names {sorted(map(str, named))}, none of them 'default'"
        template, field = named["default"], f"{field} 'default'"
    if template is None:
        return None, f"no {CHAT_TEMPLATE_FILE}, no {field}, not a built-in instruct preset"
    if not isinstance(template, str):
        return None, f"{field} is a {type(template).__name__}, not a string"
    return template, field


def rope_settings(hf_config):
    """(theta, rope type, all rope settings) from ``rope_scaling`` or transformers 5's ``rope_parameters``."""
    rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = hf_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return theta, rope.get("rope_type", rope.get("type", "default")), rope
