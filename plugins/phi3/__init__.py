"""Phi-3 mini (4k and 128k context)."""

from lmq.core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(__name__, "Phi3", hf_model_types=("phi3",))
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
