"""Falcon-RW (falcon-rw-1b): ALiBi, multi-head attention with biases."""

from core.plugins import Architecture, hookimpl
from plugins.falcon.falcon_presets import backbone_presets

ARCHITECTURE = Architecture(
    name="falcon",
    backbone="plugins.falcon.falcon_backbone:FalconBackbone",
    tokenizer="plugins.falcon.falcon_tokenizer:FalconTokenizer",
    preprocessor="plugins.falcon.falcon_causal_lm_preprocessor:FalconCausalLMPreprocessor",
    task="plugins.falcon.falcon_causal_lm:FalconCausalLM",
    hf_model_types=("falcon",),
    hf_converter="plugins.falcon.falcon_hf",
    presets=backbone_presets,
)


@hookimpl
def register_architectures(register):
    register(ARCHITECTURE)


__getattr__ = ARCHITECTURE.lazy_module_attributes(__name__)
