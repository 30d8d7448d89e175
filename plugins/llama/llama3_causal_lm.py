"""Llama3CausalLM (default sampler: top_k, as in KerasHub); "auto" stop ids are both end tokens."""

from lmq.core.models.causal_lm import CausalLM
from lmq.plugins.llama.llama3_backbone import Llama3Backbone
from lmq.plugins.llama.llama3_causal_lm_preprocessor import Llama3CausalLMPreprocessor


class Llama3CausalLM(CausalLM):
    backbone_cls = Llama3Backbone
    preprocessor_cls = Llama3CausalLMPreprocessor
