"""Llama3Backbone: KerasHub's class name for the Llama 3 / 3.1 presets."""

from lmq.plugins.llama.llama_backbone import LlamaBackbone


class Llama3Backbone(LlamaBackbone):
    """Llama 3 / 3.1: ``LlamaBackbone``'s network, config and weight layout under the
    name KerasHub saves Llama 3 presets with (its tokenizer is byte-level BPE)."""
