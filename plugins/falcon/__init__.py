"""Falcon-RW (falcon-rw-1b): ALiBi, multi-head attention with biases."""

from core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(__name__, "Falcon", hf_model_types=("falcon",))
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
