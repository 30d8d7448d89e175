"""Mistral 7B (v0.1, instruct v0.1 and v0.2)."""

from core.plugins import Architecture, hookimpl
from plugins.mistral.mistral_presets import backbone_presets

ARCHITECTURE = Architecture(
    name="mistral",
    backbone="plugins.mistral.mistral_backbone:MistralBackbone",
    tokenizer="plugins.mistral.mistral_tokenizer:MistralTokenizer",
    preprocessor="plugins.mistral.mistral_causal_lm_preprocessor:MistralCausalLMPreprocessor",
    task="plugins.mistral.mistral_causal_lm:MistralCausalLM",
    hf_model_types=("mistral",),
    hf_converter="plugins.mistral.mistral_hf",
    presets=backbone_presets,
)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)


__getattr__ = ARCHITECTURE.lazy_module_attributes(__name__)
