"""Mistral 7B (v0.1, instruct v0.1 and v0.2)."""

from lmq.core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(__name__, "Mistral", hf_model_types=("mistral",))
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
