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
    """The encoder's keys and values for each decoder layer: [layers, groups, heads, length, head_dim],
    and which encoder positions are real: ``mask`` [groups, 1, 1, length], additive (0 or -inf).

    One group per request: the ``rows_per_group`` neighbouring decoder rows of a request
    (its beams, or contrastive search's candidates) share its memory and query it together,
    so reordering beams moves no memory and each step reads it once per request, not per row.
    Part of a generation's cache, it moves with the rows, slot by slot as the decoder's
    ``KVCache`` does (``move_rows``, ``select_rows``, ``take``): a row moving within its
    group moves nothing here. ``write`` fills the groups of requests that join a running
    batch, and a decode step reads ``first(rows)``.
    """

    def __init__(self, keys, values, mask, rows_per_group=1):
        self.keys, self.values, self.mask = keys, values, mask
        self.rows_per_group = rows_per_group

    @classmethod
    def empty(cls, num_layers, rows, num_heads, length, head_dim, dtype, device, rows_per_group=1):
        """Room for the requests of ``rows`` decoder rows, ``rows_per_group`` each."""
        groups = -(-rows // rows_per_group)
        shape = (num_layers, groups, num_heads, length, head_dim)
        keys = torch.zeros(shape, dtype=dtype, device=device)
        mask = torch.full((groups, 1, 1, length), float("-inf"), dtype=dtype, device=device)
        return cls(keys, torch.zeros_like(keys), mask, rows_per_group)

    @classmethod
    def of(cls, blocks, encoder_output, padding_mask):
        """Computes every block's cross-attention keys/values of ``encoder_output`` [batch, length, hidden]."""
        projected = [block.cross_attention_keys_values(encoder_output) for block in blocks]
        keys = torch.stack([k for k, _ in projected])
        values = torch.stack([v for _, v in projected])
        return cls(keys, values, additive_mask(padding_mask[:, None, None, :], keys.dtype))

    def _groups(self, slots, what):
        if (slots % self.rows_per_group).any():
            raise ValueError(f"{what}: slots {slots.tolist()} do not start groups of {self.rows_per_group} rows.")
        return slots // self.rows_per_group

    def write(self, slots, other):
        """Copies ``other`` (one group per slot, no longer than this memory) into the groups
        that start at ``slots``."""
        groups, length = self._groups(slots, "write"), other.keys.shape[3]
        self.keys[:, groups] = 0
        self.values[:, groups] = 0
        self.mask[groups] = float("-inf")
        self.keys[:, groups, :, :length] = other.keys
        self.values[:, groups, :, :length] = other.values
        self.mask[groups, :, :, :length] = other.mask

    def first(self, rows):
        """The memory of decoder rows ``[0, rows)`` (views): what a decode step of that many rows attends to."""
        return EncoderMemory(*(t.narrow(d, 0, rows // self.rows_per_group) for t, d in self._tensors()))

    def move_rows(self, source, target):
        """Rows ``source`` move to slots ``target``: their requests' memories go with them
        when they change group (a request moving to other slots), not when beams reorder."""
        source, target = source // self.rows_per_group, target // self.rows_per_group
        if self.rows_per_group > 1:
            moved = source != target
            if not moved.any():
                return
            source, target = torch.stack([source[moved], target[moved]]).unique(dim=1)
        if len(target.unique()) != len(target):
            raise ValueError("Rows of different requests cannot move into one request's slots.")
        for tensor, dim in self._tensors():
            tensor.index_copy_(dim, target, tensor.index_select(dim, source))

    def select_rows(self, rows):
        self.move_rows(rows, torch.arange(len(rows), device=rows.device))

    def take(self, other, rows):
        """Copies the memory of ``other``'s first ``rows`` rows (as long as this one) into this one."""
        groups = -(-rows // self.rows_per_group)
        for (tensor, dim), (source, _) in zip(self._tensors(), other._tensors()):
            tensor.narrow(dim, 0, groups).copy_(source.narrow(dim, 0, groups))

    def _tensors(self):
        """Each tensor with its group dimension."""
        return (self.keys, 1), (self.values, 1), (self.mask, 0)


def additive_mask(mask, dtype):
    """A boolean mask (True = attend) as the additive one attention adds to its scores (0 or -inf):
    built once per pass instead of in every layer's attention call."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


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

    def _cross_attend(self, x, memory, layer, training):
        """``x`` [rows, seq, hidden] over the memory; the rows of a group (a request's beams)
        query their one memory together, as one sequence of their tokens."""
        rows, seq, hidden = x.shape
        groups = memory.keys.shape[1]
        query = self.cross_attention._heads(x.reshape(groups, rows // groups * seq, hidden), "query")
        crossed = self.cross_attention.attend(
            query, memory.keys[layer], memory.values[layer], memory.mask, training=training
        )
        return crossed.reshape(rows, seq, hidden)

    def call(self, x, context, memory, layer, training=False):
        """``memory`` (an ``EncoderMemory``) holds this block's keys/values at index ``layer``."""
        attended = self.attention.call(x, context, training=training)
        x = self.attention_norm.call(x + _dropout(attended, self.dropout, training))
        crossed = self._cross_attend(x, memory, layer, training)
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

    def update(self, layer, keys, values, context):
        return self.self_attention.update(layer, keys, values, context)

    def step(self, positions, key_length):
        return self.self_attention.step(positions, key_length)

    def move_rows(self, source, target, starts=None, stops=None):
        self.self_attention.move_rows(source, target, starts, stops)
        self.memory.move_rows(source, target)

    def select_rows(self, rows):
        self.self_attention.select_rows(rows)
        self.memory.select_rows(rows)

    def release_rows(self, first, last):
        self.self_attention.release_rows(first, last)  # the encoder's memory is as long as the longest input

    def take(self, other, rows):
        self.self_attention.take(other.self_attention, rows)
        self.memory.take(other.memory, rows)
