"""Building blocks that every architecture composes.

Each block is a Keras layer (so it owns Keras variables, saves, trains with
``fit``) whose ``call`` is plain PyTorch. The generation loop calls ``call``
directly, skipping Keras' per-call machinery on the hot path.
"""

from core.layers.attention import AttentionContext, CachedAttention, KVCache, RollingKVCache
from core.layers.decoder import DecoderBlock, ParallelDecoderBlock
from core.layers.embedding import ReversibleEmbedding
from core.layers.feedforward import FeedForward, GatedFeedForward
from core.layers.norms import LayerNorm, RMSNorm
from core.layers.rotary import RotaryEmbedding

__all__ = [
    "AttentionContext",
    "CachedAttention",
    "DecoderBlock",
    "FeedForward",
    "GatedFeedForward",
    "KVCache",
    "LayerNorm",
    "ParallelDecoderBlock",
    "RMSNorm",
    "RollingKVCache",
    "ReversibleEmbedding",
    "RotaryEmbedding",
]
