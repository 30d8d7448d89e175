"""MistralCausalLM (default sampler: top_k, as in KerasHub)."""

from lmq.core.models.causal_lm import CausalLM
from lmq.plugins.mistral.mistral_backbone import MistralBackbone
from lmq.plugins.mistral.mistral_causal_lm_preprocessor import MistralCausalLMPreprocessor


class MistralCausalLM(CausalLM):
    backbone_cls = MistralBackbone
    preprocessor_cls = MistralCausalLMPreprocessor
