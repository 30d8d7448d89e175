"""Phi3CausalLMPreprocessor."""

from lmq.core.models.preprocessor import CausalLMPreprocessor
from lmq.plugins.phi3.phi3_tokenizer import Phi3Tokenizer


class Phi3CausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = Phi3Tokenizer
