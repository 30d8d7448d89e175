"""Architectures as plugins: the built-in ones live in this package's sub-packages, and
this module is the one surface a third-party architecture imports.

A plugin is a package with an ``lmq.plugins`` entry point (see ``lmq.core.plugins``)::

    from lmq.plugins import Architecture, plugin_hooks

    ARCHITECTURE = Architecture.in_package(__name__, "MiniGPT", name="minigpt")
    register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE)

Its model files build from the names below (the shared layers, the task base classes,
the tokenizers). Those load keras, so they are imported when first used, not here:
listing architectures (the API does) imports this module without keras.
"""

import importlib

from lmq.core.plugins import Architecture, PresetInfo, hookimpl, plugin_hooks

_MODEL_NAMES = {
    "lmq.core.layers": (
        "AttentionContext", "CachedAttention", "CrossAttentionDecoderBlock", "DecoderBlock", "EncoderBlock",
        "EncoderMemory", "FeedForward", "GatedFeedForward", "KVCache", "LayerNorm", "ParallelDecoderBlock",
        "PositionEmbedding", "RMSNorm", "RollingKVCache", "ReversibleEmbedding", "RotaryEmbedding", "Seq2SeqCache",
    ),
    "lmq.core.models": (
        "Backbone", "BytePairTokenizer", "CausalLM", "CausalLMPreprocessor", "DecoderOnlyBackbone",
        "SentencePieceTokenizer", "Seq2SeqLM", "Seq2SeqLMPreprocessor", "Tokenizer",
    ),
    "lmq.core.models.backbone": ("keras_weight_paths", "numbered"),
    "lmq.core.presets.files": ("preset_files",),
}
_MODULE_OF = {name: module for module, names in _MODEL_NAMES.items() for name in names}

__all__ = ["Architecture", "PresetInfo", "hookimpl", "plugin_hooks", *_MODULE_OF]


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
