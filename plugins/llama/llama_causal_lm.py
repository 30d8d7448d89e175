"""LlamaCausalLM (default sampler: top_k, as in KerasHub)."""

from lmq.core.models.causal_lm import CausalLM
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from lmq.plugins.llama.llama_causal_lm_preprocessor import LlamaCausalLMPreprocessor


class LlamaCausalLM(CausalLM):
    backbone_cls = LlamaBackbone
    preprocessor_cls = LlamaCausalLMPreprocessor
