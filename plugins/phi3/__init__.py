"""Phi-3 mini (4k and 128k context)."""

from core.plugins import Architecture, hookimpl
from plugins.phi3.phi3_presets import backbone_presets

ARCHITECTURE = Architecture(
    name="phi3",
    backbone="plugins.phi3.phi3_backbone:Phi3Backbone",
    tokenizer="plugins.phi3.phi3_tokenizer:Phi3Tokenizer",
    preprocessor="plugins.phi3.phi3_causal_lm_preprocessor:Phi3CausalLMPreprocessor",
    task="plugins.phi3.phi3_causal_lm:Phi3CausalLM",
    hf_model_types=("phi3",),
    hf_converter="plugins.phi3.phi3_hf",
    presets=backbone_presets,
)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)


__getattr__ = ARCHITECTURE.lazy_module_attributes(__name__)
