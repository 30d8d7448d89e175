"""Post-norm encoder and decoder blocks (Bart), and the encoder's keys/values that
every decoder step attends to.

Post-norm: ``norm(x + dropout(branch(x)))`` after each branch, as in the original
Transformer (KerasHub's ``TransformerEncoder``/``TransformerDecoder`` with
``normalize_first=False``). The decoder's cross-attention reads an ``EncoderMemory``:
each layer's keys and values of the encoder output, computed once per prompt.
"""

import keras
import torch


def _dropout(x, rate, training):
    return torch.nn.functional.dropout(x, rate, training=True) if training and rate else x


class EncoderMemory:
    """The encoder's keys and values for each decoder layer: [layers, batch, heads, length, head_dim],
    and which encoder positions are real: ``mask`` [batch, 1, 1, length] (True = attend).

    Part of a generation's cache, so it moves with the rows: ``select_rows`` (beams, finished
    rows) and ``add_rows`` (requests joining a running batch; ``write`` then fills them).
    """

    def __init__(self, keys, values, mask):
        self.keys, self.values, self.mask = keys, values, mask

    @classmethod
    def empty(cls, num_layers, batch_size, num_heads, length, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_heads, length, head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        mask = torch.zeros((batch_size, 1, 1, length), dtype=torch.bool, device=device)
        return cls(keys, torch.zeros_like(keys), mask)

    @classmethod
    def of(cls, blocks, encoder_output, padding_mask):
        """Computes every block's cross-attention keys/values of ``encoder_output`` [batch, length, hidden]."""
        projected = [block.cross_attention_keys_values(encoder_output) for block in blocks]
        keys = torch.stack([k for k, _ in projected])
        values = torch.stack([v for _, v in projected])
        return cls(keys, values, padding_mask[:, None, None, :].bool())

    def write(self, rows, other):
        """Copies ``other`` (a memory of len(rows) rows, no longer than this one) into ``rows``."""
        length = other.keys.shape[3]
        self.keys[:, rows] = 0
        self.values[:, rows] = 0
        self.mask[rows] = False
        self.keys[:, rows, :, :length] = other.keys
        self.values[:, rows, :, :length] = other.values
        self.mask[rows, :, :, :length] = other.mask

    def select_rows(self, rows):
        self.keys, self.values, self.mask = self.keys[:, rows], self.values[:, rows], self.mask[rows]

    def add_rows(self, count):
        rows = torch.cat([torch.arange(self.mask.shape[0], device=self.mask.device), self.mask.new_zeros(count, dtype=torch.long)])
        self.select_rows(rows)


class EncoderBlock(keras.layers.Layer):
    """``h = norm(x + attention(x))`` then ``norm(h + feedforward(h))``; attention sees the
    whole (unpadded) input."""

    def __init__(self, attention, feedforward, attention_norm, feedforward_norm, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.attention = attention
        self.feedforward = feedforward
        self.attention_norm = attention_norm
        self.feedforward_norm = feedforward_norm
        self.dropout = dropout
        self.built = True

    def call(self, x, context, training=False):
        attended = self.attention.call(x, context, training=training)
        x = self.attention_norm.call(x + _dropout(attended, self.dropout, training))
        fed = self.feedforward.call(x)
        return self.feedforward_norm.call(x + _dropout(fed, self.dropout, training))


class CrossAttentionDecoderBlock(EncoderBlock):
    """Causal self-attention, then attention over the encoder's ``EncoderMemory``, then the
    feed-forward; each followed by its residual and norm (post-norm)."""

    def __init__(self, attention, cross_attention, feedforward, attention_norm, cross_attention_norm, feedforward_norm, **kwargs):
        super().__init__(attention, feedforward, attention_norm, feedforward_norm, **kwargs)
        self.cross_attention = cross_attention
        self.cross_attention_norm = cross_attention_norm

    def cross_attention_keys_values(self, encoder_output):
        """Encoder output [batch, length, hidden] -> keys, values [batch, heads, length, head_dim]."""
        return self.cross_attention._heads(encoder_output, "key"), self.cross_attention._heads(encoder_output, "value")

    def call(self, x, context, memory, layer, training=False):
        """``memory`` (an ``EncoderMemory``) holds this block's keys/values at index ``layer``."""
        attended = self.attention.call(x, context, training=training)
        x = self.attention_norm.call(x + _dropout(attended, self.dropout, training))
        query = self.cross_attention._heads(x, "query")
        crossed = self.cross_attention.attend(
            query, memory.keys[layer], memory.values[layer], memory.mask, training=training
        )
        x = self.cross_attention_norm.call(x + _dropout(crossed, self.dropout, training))
        fed = self.feedforward.call(x)
        return self.feedforward_norm.call(x + _dropout(fed, self.dropout, training))


class Seq2SeqCache:
    """A generation's cache for an encoder-decoder: the decoder's own ``KVCache`` and the
    encoder's ``EncoderMemory``, moved together so beams and joining rows keep both."""

    def __init__(self, self_attention, memory):
        self.self_attention, self.memory = self_attention, memory

    @property
    def max_length(self):
        return self.self_attention.max_length

    @property
    def slots(self):
        return self.self_attention.slots

    def update(self, layer, keys, values, context):
        return self.self_attention.update(layer, keys, values, context)

    def step(self, positions, key_length):
        return self.self_attention.step(positions, key_length)

    def move_rows(self, source, target):
        self.self_attention.move_rows(source, target)
        self.memory.move_rows(source, target)

    def select_rows(self, rows):
        self.self_attention.select_rows(rows)
        self.memory.select_rows(rows)

    def take(self, other, rows):
        self.self_attention.take(other.self_attention, rows)
        self.memory.take(other.memory, rows)
