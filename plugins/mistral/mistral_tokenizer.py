"""MistralTokenizer: SentencePiece with ``<s>``/``</s>``; id 0 pads."""

from lmq.core.models.tokenizer import SentencePieceTokenizer


class MistralTokenizer(SentencePieceTokenizer):
    start_token = "<s>"
    end_token = "</s>"
