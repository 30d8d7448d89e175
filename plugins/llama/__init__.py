"""Llama 2, Vicuna (``LlamaBackbone``) and Llama 3 / 3.1 (``Llama3Backbone``).

A transformers ``llama`` checkpoint with a SentencePiece ``tokenizer.model`` is Llama;
one that ships only ``tokenizer.json`` (byte-level BPE) is Llama 3.
"""

from lmq.core.plugins import Architecture, plugin_hooks

ARCHITECTURE = Architecture.in_package(
    __name__, "Llama", hf_model_types=("llama",), hf_tokenizer_files=("tokenizer.model",)
)
LLAMA3 = Architecture.in_package(
    __name__,
    "Llama3",
    name="llama3",
    hf_model_types=("llama",),
    hf_converter="lmq.plugins.llama.llama_hf",
    hf_tokenizer_files=("tokenizer.json",),
)
register_architectures, __getattr__ = plugin_hooks(__name__, ARCHITECTURE, LLAMA3)
