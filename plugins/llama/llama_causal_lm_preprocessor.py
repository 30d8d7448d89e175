"""LlamaCausalLMPreprocessor."""

from lmq.core.models.preprocessor import CausalLMPreprocessor
from lmq.plugins.llama.llama_tokenizer import LlamaTokenizer


class LlamaCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = LlamaTokenizer
