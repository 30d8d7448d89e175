"""MistralCausalLMPreprocessor."""

from core.models.preprocessor import CausalLMPreprocessor
from plugins.mistral.mistral_tokenizer import MistralTokenizer


class MistralCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = MistralTokenizer
