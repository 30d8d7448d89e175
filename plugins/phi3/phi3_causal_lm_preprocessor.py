"""Phi3CausalLMPreprocessor."""

from core.models.preprocessor import CausalLMPreprocessor
from plugins.phi3.phi3_tokenizer import Phi3Tokenizer


class Phi3CausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = Phi3Tokenizer
