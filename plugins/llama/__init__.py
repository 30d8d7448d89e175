"""Llama 2, Llama 3 / 3.1 and Vicuna."""

from core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(__name__, "Llama", hf_model_types=("llama",))
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
