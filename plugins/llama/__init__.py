"""Llama 2, Llama 3 / 3.1 and Vicuna."""

from core.plugins import Architecture, hookimpl
from plugins.llama.llama_presets import backbone_presets

ARCHITECTURE = Architecture(
    name="llama",
    backbone="plugins.llama.llama_backbone:LlamaBackbone",
    tokenizer="plugins.llama.llama_tokenizer:LlamaTokenizer",
    preprocessor="plugins.llama.llama_causal_lm_preprocessor:LlamaCausalLMPreprocessor",
    task="plugins.llama.llama_causal_lm:LlamaCausalLM",
    hf_model_types=("llama",),
    hf_converter="plugins.llama.llama_hf",
    presets=backbone_presets,
)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)


__getattr__ = ARCHITECTURE.lazy_module_attributes(__name__)
