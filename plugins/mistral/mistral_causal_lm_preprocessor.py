"""MistralCausalLMPreprocessor."""

from lmq.core.models.preprocessor import CausalLMPreprocessor
from lmq.plugins.mistral.mistral_tokenizer import MistralTokenizer


class MistralCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = MistralTokenizer
