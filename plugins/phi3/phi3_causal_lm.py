"""Phi3CausalLM (default sampler: top_k, as in KerasHub)."""

from lmq.core.models.causal_lm import CausalLM
from lmq.plugins.phi3.phi3_backbone import Phi3Backbone
from lmq.plugins.phi3.phi3_causal_lm_preprocessor import Phi3CausalLMPreprocessor


class Phi3CausalLM(CausalLM):
    backbone_cls = Phi3Backbone
    preprocessor_cls = Phi3CausalLMPreprocessor
