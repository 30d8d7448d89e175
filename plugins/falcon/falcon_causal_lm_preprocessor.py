"""FalconCausalLMPreprocessor."""

from lmq.core.models.preprocessor import CausalLMPreprocessor
from lmq.plugins.falcon.falcon_tokenizer import FalconTokenizer


class FalconCausalLMPreprocessor(CausalLMPreprocessor):
    tokenizer_cls = FalconTokenizer
