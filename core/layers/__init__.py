"""Building blocks that every architecture composes.

Each block is a Keras layer (so it owns Keras variables, saves, trains with
``fit``) whose ``call`` is plain PyTorch. The generation loop calls ``call``
directly, skipping Keras' per-call machinery on the hot path.
"""

from lmq.core.layers.attention import AttentionContext, CachedAttention
from lmq.core.layers.cache import KVCache, RollingKVCache
from lmq.core.layers.decoder import DecoderBlock, ParallelDecoderBlock
from lmq.core.layers.embedding import PositionEmbedding, ReversibleEmbedding
from lmq.core.layers.encoder_decoder import CrossAttentionDecoderBlock, EncoderBlock, EncoderMemory, Seq2SeqCache
from lmq.core.layers.feedforward import FeedForward, GatedFeedForward
from lmq.core.layers.norms import LayerNorm, RMSNorm
from lmq.core.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionContext",
    "CachedAttention",
    "CrossAttentionDecoderBlock",
    "DecoderBlock",
    "EncoderBlock",
    "EncoderMemory",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerNorm",
    "ParallelDecoderBlock",
    "PositionEmbedding",
    "RMSNorm",
    "RollingKVCache",
    "ReversibleEmbedding",
    "RotaryEmbedding",
    "Seq2SeqCache",
]
