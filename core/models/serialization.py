"""KerasHub's JSON shape for configs, with classes resolved only through the registry.

A KerasHub preset names classes like ``{"class_name": "LlamaBackbone",
"registered_name": "keras_hub>LlamaBackbone", "module": "..."}``. lmq writes the
same shape and, when reading, looks the class name up in the plugin registry;
the ``module`` field is never imported.
"""

import re


def snake_case(name):
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


def layer_config(name, dtype, config_file):
    """The keys KerasHub writes for every tokenizer and preprocessor layer."""
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": dtype}, "registered_name": None}
    return {"name": name, "trainable": True, "dtype": policy, "config_file": config_file}


class KerasHubSerializable:
    @classmethod
    def default_name(cls):
        return snake_case(cls.__name__)

    @classmethod
    def keras_hub_module(cls):
        """``lmq.plugins.llama.llama3_backbone`` -> ``keras_hub.src.models.llama3.llama3_backbone``:
        KerasHub's package is the file name's first word."""
        parts = cls.__module__.split(".")
        if parts[:2] == ["lmq", "plugins"]:
            return ".".join(["keras_hub.src.models", parts[-1].split("_")[0], parts[-1]])
        return cls.__module__

    def serialize(self):
        return {
            "module": self.keras_hub_module(),
            "class_name": type(self).__name__,
            "config": self.get_config(),
            "registered_name": f"keras_hub>{type(self).__name__}",
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def class_name_of(serialized, source):
    """The class a serialized config names; ``source`` (a file) goes into errors."""
    if not isinstance(serialized, dict) or "class_name" not in serialized:
        raise ValueError(f"{source}: not a serialized Keras object (no 'class_name').")
    registered = serialized.get("registered_name") or ""
    return registered.split(">")[-1] if ">" in registered else serialized["class_name"]


def deserialize(serialized, source, **overrides):
    """Builds the object a serialized config describes, its class found in the registry."""
    from lmq.core.plugins import get_registry

    cls = get_registry().find_class(class_name_of(serialized, source), source=source)
    config = dict(serialized.get("config") or {})
    config.update(overrides)
    return cls.from_config(config)
