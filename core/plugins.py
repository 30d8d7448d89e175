"""Plugin hooks and the registry of architectures.

Every architecture, built-in or third-party, is a package exposing an entry point
in the ``lmq.plugins`` group whose module implements one hook. Laid out as KerasHub
lays out an architecture (see ``Architecture.in_package``), its ``__init__.py`` is::

    from lmq.core.plugins import Architecture, plugin_hooks

    ARCHITECTURE = Architecture.in_package(__name__, "Llama", hf_model_types=("llama",))
    register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)

Records hold import paths as ``"module:Class"`` strings, imported only when a
class is needed, so listing architectures (the API does) never imports keras.
``LMQ_PLUGINS`` (comma-separated entry-point names) restricts which plugins load.
"""

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field, replace

import pluggy

from lmq.core.names import TaskKind

ENTRY_POINT_GROUP = "lmq.plugins"

TASK_NAMES = {TaskKind.causal_lm: ("causal_lm", "CausalLM"), TaskKind.seq2seq_lm: ("seq2seq_lm", "Seq2SeqLM")}  # file, class

hookspec = pluggy.HookspecMarker("lmq")
hookimpl = pluggy.HookimplMarker("lmq")
logger = logging.getLogger(__name__)


class HookSpecs:
    @hookspec
    def register_architectures(self, register):
        """Call ``register(Architecture(...))`` once for each architecture the plugin provides."""


@dataclass(frozen=True)
class PresetInfo:
    """A built-in preset name: where its files are, and what it is."""

    handle: str
    description: str = ""
    params: str = ""


@dataclass(frozen=True)
class Architecture:
    name: str
    backbone: str  # "module:Class"
    tokenizer: str
    preprocessor: str
    task: str  # the CausalLM or Seq2SeqLM subclass
    task_kind: TaskKind = TaskKind.causal_lm
    hf_model_types: tuple = ()
    hf_converter: str | None = None  # module with backbone_config and convert_weights
    # Architectures sharing a model_type tell their checkpoints apart by tokenizer file (see for_hf_model_type).
    hf_tokenizer_files: tuple = ()
    presets: dict = field(default_factory=dict)  # name -> PresetInfo
    extra_classes: tuple = ()  # "module:Class" of other classes it answers to (a second backbone layout)
    plugin: str = ""  # the entry point that registered it

    def __post_init__(self):
        """A plugin may name its task kind as a string ("seq2seq_lm"); an unknown one fails here, naming it."""
        object.__setattr__(self, "task_kind", TaskKind(self.task_kind))

    @property
    def class_paths(self):
        """KerasHub class name -> import path, for every class this architecture answers to."""
        paths = (self.backbone, self.tokenizer, self.preprocessor, self.task, *self.extra_classes)
        return {path.rsplit(":", 1)[1]: path for path in paths}

    def load_class(self, class_name):
        return import_path(self.class_paths[class_name])

    @classmethod
    def in_package(cls, package, prefix, **fields):
        """The record of an architecture laid out as KerasHub lays one out, in ``package``
        (``lmq.plugins.llama``, whose last part ``llama`` names the architecture)::

            llama_backbone.py                  LlamaBackbone
            llama_tokenizer.py                 LlamaTokenizer
            llama_causal_lm_preprocessor.py    LlamaCausalLMPreprocessor
            llama_causal_lm.py                 LlamaCausalLM    (seq2seq_lm: ..._seq2seq_lm.py, ...Seq2SeqLM)
            llama_presets.py                   backbone_presets: {name: PresetInfo}, if there are any
            llama_hf.py                        the transformers converter, when hf_model_types are given

        ``fields`` give the record's other fields, or override these.
        """
        name = fields.get("name", package.rpartition(".")[2])
        module = f"{package}.{name}"
        task_file, task_class = TASK_NAMES[TaskKind(fields.get("task_kind", TaskKind.causal_lm))]
        presets_module = f"{module}_presets"
        defaults = {
            "name": name,
            "backbone": f"{module}_backbone:{prefix}Backbone",
            "tokenizer": f"{module}_tokenizer:{prefix}Tokenizer",
            "preprocessor": f"{module}_{task_file}_preprocessor:{prefix}{task_class}Preprocessor",
            "task": f"{module}_{task_file}:{prefix}{task_class}",
            "hf_converter": f"{module}_hf" if fields.get("hf_model_types") else None,
            "presets": (
                importlib.import_module(presets_module).backbone_presets
                if importlib.util.find_spec(presets_module)
                else {}
            ),
        }
        return cls(**{**defaults, **fields})

    def load(self, role):
        """The class for ``role`` ("backbone", "tokenizer", "preprocessor", "task")."""
        return import_path(getattr(self, role))


def plugin_hooks(module_name, *architectures):
    """What a plugin's ``__init__`` exports: its ``register_architectures`` hook, and a module
    ``__getattr__`` so that ``from lmq.plugins.llama import LlamaCausalLM`` imports on first use
    (registering a plugin never imports keras)."""

    @hookimpl
    def register_architectures(register):
        for architecture in architectures:
            register(architecture)

    def __getattr__(name):
        for architecture in architectures:
            if name in architecture.class_paths:
                return architecture.load_class(name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return register_architectures, __getattr__


def import_path(path):
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


class Registry:
    def __init__(self):
        self.manager = pluggy.PluginManager("lmq")
        self.manager.add_hookspecs(HookSpecs)
        self._architectures = {}
        self.load_errors = {}  # entry-point name -> message
        self.installed_plugins = []  # every lmq.plugins entry point's name
        self.unknown_plugins = []  # names the allow-list gives that no installed plugin has

    def load_entry_points(self, allowed=None):
        """Registers every allowed ``lmq.plugins`` entry point, then collects their architectures."""
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        self.installed_plugins = sorted(entry_point.name for entry_point in entry_points)
        self.unknown_plugins = sorted(set(allowed or ()) - set(self.installed_plugins))
        for entry_point in entry_points:
            if allowed is not None and entry_point.name not in allowed:
                continue
            try:
                self.manager.register(entry_point.load(), name=entry_point.name)
            except Exception as error:  # one broken plugin must not take the others down
                self._load_failed(entry_point.name, f"{entry_point.value}: {error}")
        self.collect()

    def collect(self):
        """Calls each plugin's ``register_architectures`` hook, one plugin at a time."""
        for hook in self.manager.hook.register_architectures.get_hookimpls():
            found = []
            try:
                hook.function(register=found.append)
                for architecture in found:
                    self.add(replace(architecture, plugin=hook.plugin_name))
            except Exception as error:
                self._load_failed(hook.plugin_name, str(error))

    def _load_failed(self, plugin, reason):
        message = f"lmq plugin {plugin!r} failed to load: {reason}"
        self.load_errors[plugin] = message
        logger.warning(message)

    def add(self, architecture):
        if architecture.name in self._architectures:
            raise ValueError(f"Architecture {architecture.name!r} is registered twice.")
        self._architectures[architecture.name] = architecture

    def architectures(self):
        return list(self._architectures.values())

    def get(self, name):
        if name not in self._architectures:
            raise KeyError(
                f"Unknown architecture {name!r}; registered: {sorted(self._architectures)}."
            )
        return self._architectures[name]

    def find_class(self, class_name, source="config"):
        """Resolves a KerasHub class name (``LlamaBackbone``) through the registered records."""
        architecture = self.architecture_of_class(class_name)
        if architecture is not None:
            return architecture.load_class(class_name)
        raise ValueError(
            f"{source}: unknown class {class_name!r}; no registered lmq plugin provides it "
            f"(architectures: {sorted(self._architectures)})."
        )

    def architecture_of_class(self, class_name):
        for architecture in self._architectures.values():
            if class_name in architecture.class_paths:
                return architecture
        return None

    def for_hf_model_type(self, model_type, directory=None):
        """The architecture converting ``model_type`` checkpoints. When several do (Llama and
        Llama 3), the first with one of its ``hf_tokenizer_files`` in ``directory``, else the first."""
        candidates = [a for a in self._architectures.values() if model_type in a.hf_model_types]
        if directory is not None:
            for architecture in candidates:
                if any((directory / name).is_file() for name in architecture.hf_tokenizer_files):
                    return architecture
        return candidates[0] if candidates else None

    def find_preset(self, name):
        """(architecture, PresetInfo) for a built-in preset name, or None."""
        for architecture in self._architectures.values():
            if name in architecture.presets:
                return architecture, architecture.presets[name]
        return None


def allowed_plugins():
    value = os.environ.get("LMQ_PLUGINS", "").strip()
    return None if not value else {name.strip() for name in value.split(",") if name.strip()}


@functools.cache
def get_registry():
    registry = Registry()
    registry.load_entry_points(allowed_plugins())
    return registry
