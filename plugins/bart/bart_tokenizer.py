"""BartTokenizer: byte-level BPE (GPT-2's, as in Roberta) with ``<s>``, ``</s>`` and ``<pad>``, as in KerasHub."""

from lmq.core.models.tokenizer import BytePairTokenizer


class BartTokenizer(BytePairTokenizer):
    start_token = "<s>"
    end_token = "</s>"
    pad_token = "<pad>"
