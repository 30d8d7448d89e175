"""FalconCausalLMPreprocessor."""

from core.models.preprocessor import CausalLMPreprocessor
from plugins.falcon.falcon_tokenizer import FalconTokenizer


class FalconCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = FalconTokenizer
