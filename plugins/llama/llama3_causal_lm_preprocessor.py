"""Llama3CausalLMPreprocessor."""

from core.models.preprocessor import CausalLMPreprocessor
from plugins.llama.llama3_tokenizer import Llama3Tokenizer


class Llama3CausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = Llama3Tokenizer
