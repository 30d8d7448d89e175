"""Llama3CausalLMPreprocessor."""

from lmq.core.models.preprocessor import CausalLMPreprocessor
from lmq.plugins.llama.llama3_tokenizer import Llama3Tokenizer


class Llama3CausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = Llama3Tokenizer
