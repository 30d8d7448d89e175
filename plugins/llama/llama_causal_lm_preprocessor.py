"""LlamaCausalLMPreprocessor."""

from core.models.preprocessor import CausalLMPreprocessor
from plugins.llama.llama_tokenizer import LlamaTokenizer


class LlamaCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = LlamaTokenizer
