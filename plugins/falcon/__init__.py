"""Falcon: the falcon-rw-1b layout (ALiBi, multi-head attention with biases) as KerasHub's
``FalconBackbone``, and the Falcon-7B and 40B/180B layouts (rotary, multi-query or grouped
key/value heads, attention in parallel with the MLP) as ``FalconRotaryBackbone``.

KerasHub has no class for the rotary layouts: lmq saves them in KerasHub's preset format
under its own class name ``FalconRotaryBackbone``, registered here, so lmq loads such a
preset and KerasHub does not.
"""

from lmq.core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(
    __name__,
    "Falcon",
    hf_model_types=("falcon",),
    extra_classes=("lmq.plugins.falcon.falcon_rotary_backbone:FalconRotaryBackbone",),
)
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)
