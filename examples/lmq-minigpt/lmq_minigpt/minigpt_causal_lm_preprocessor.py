"""MiniGPTCausalLMPreprocessor."""

from lmq.plugins import CausalLMPreprocessor
from lmq_minigpt.minigpt_tokenizer import MiniGPTTokenizer


class MiniGPTCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = MiniGPTTokenizer
