"""FalconTokenizer: byte-level BPE whose ``<|endoftext|>`` starts and ends text; id 0 pads, as in KerasHub."""

from lmq.core.models.tokenizer import BytePairTokenizer


class FalconTokenizer(BytePairTokenizer):
    start_token = "<|endoftext|>"
    end_token = "<|endoftext|>"
