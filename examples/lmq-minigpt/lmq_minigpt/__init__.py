"""MiniGPT: GPT-style pre-LayerNorm blocks (multi-head attention with biases and rotary
positions, a GELU MLP) over UTF-8 bytes. An example of an architecture that lives outside lmq."""

from lmq.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(__name__, "MiniGPT", name="minigpt")
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
