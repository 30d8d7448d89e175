"""MiniGPTCausalLM (default sampler: greedy)."""

from lmq.plugins import CausalLM
from lmq_minigpt.minigpt_backbone import MiniGPTBackbone
from lmq_minigpt.minigpt_causal_lm_preprocessor import MiniGPTCausalLMPreprocessor


class MiniGPTCausalLM(CausalLM):
    backbone_cls = MiniGPTBackbone
    preprocessor_cls = MiniGPTCausalLMPreprocessor
    default_sampler = "greedy"
