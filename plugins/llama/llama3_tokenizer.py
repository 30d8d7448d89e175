"""Llama3Tokenizer: byte-level BPE with Llama 3's special tokens; id 0 pads, as in KerasHub."""

from lmq.core.models.tokenizer import BytePairTokenizer

RESERVED_PREFIX = "<|reserved_special_token_"


class Llama3Tokenizer(BytePairTokenizer):
    """``<|begin_of_text|>`` starts text; ``<|end_of_text|>`` and ``<|eot_id|>`` (a chat turn's
    end) both stop generation; the header tokens frame a chat turn's role."""

    start_token = "<|begin_of_text|>"
    end_token = "<|end_of_text|>"
    end_of_turn_token = "<|eot_id|>"
    control_tokens = ("<|start_header_id|>", "<|end_header_id|>")

    @classmethod
    def checkpoint_unsplittable_tokens(cls, added_tokens):
        """A checkpoint's special tokens but the reserved ones (KerasHub's converter keeps the same)."""
        return [
            t["content"] for t in added_tokens if t.get("special", True) and not t["content"].startswith(RESERVED_PREFIX)
        ]
