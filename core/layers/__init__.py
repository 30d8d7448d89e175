"""Building blocks that every architecture composes.

Each block is a Keras layer (so it owns Keras variables, saves, trains with
``fit``) whose ``call`` is plain PyTorch. The generation loop calls ``call``
directly, skipping Keras' per-call machinery on the hot path.
"""

from core.layers.attention import AttentionContext, CachedAttention
from core.layers.cache import KVCache, RollingKVCache
from core.layers.decoder import DecoderBlock, ParallelDecoderBlock
from core.layers.embedding import PositionEmbedding, ReversibleEmbedding
from core.layers.encoder_decoder import CrossAttentionDecoderBlock, EncoderBlock, EncoderMemory, Seq2SeqCache
from core.layers.feedforward import FeedForward, GatedFeedForward
from core.layers.norms import LayerNorm, RMSNorm
from core.layers.rotary import RotaryEmbedding

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
