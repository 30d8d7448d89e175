"""LlamaTokenizer: SentencePiece with ``<s>``/``</s>``; id 0 pads."""

from lmq.core.models.tokenizer import SentencePieceTokenizer


class LlamaTokenizer(SentencePieceTokenizer):
    start_token = "<s>"
    end_token = "</s>"
