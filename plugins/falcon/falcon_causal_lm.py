"""FalconCausalLM (default sampler: greedy, as in KerasHub), on a FalconBackbone or a FalconRotaryBackbone."""

from lmq.core.models.causal_lm import CausalLM
from lmq.plugins.falcon.falcon_backbone import FalconBackbone
from lmq.plugins.falcon.falcon_causal_lm_preprocessor import FalconCausalLMPreprocessor


class FalconCausalLM(CausalLM):
    backbone_cls = FalconBackbone
    preprocessor_cls = FalconCausalLMPreprocessor
    default_sampler = "greedy"
