"""Phi3Tokenizer: SentencePiece with ``<s>`` and ``<|endoftext|>`` (KerasHub's end token); id 0 pads.

Phi-3's chat tokens (``<|user|>``, ``<|assistant|>``, ``<|end|>``) are ordinary pieces here,
as in KerasHub: they are kept in decoded text and do not stop generation.
"""

from lmq.core.models.tokenizer import SentencePieceTokenizer


class Phi3Tokenizer(SentencePieceTokenizer):
    start_token = "<s>"
    end_token = "<|endoftext|>"
