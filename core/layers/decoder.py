"""Pre-norm transformer decoder blocks: sequential (Llama, Mistral, Phi-3, Falcon-RW) and parallel (Falcon-7B/40B)."""

import keras
import torch


class DecoderBlock(keras.layers.Layer):
    """``x + attention(norm(x))`` then ``h + feedforward(norm(h))``.

    The parts are built by the architecture and passed in, so one block serves
    every architecture with this layout. ``dropout`` applies to both branches'
    outputs, or only to the feed-forward's when ``attention_dropout`` is given (Falcon).
    """

    def __init__(
        self, attention, feedforward, attention_norm, feedforward_norm, dropout=0.0, attention_dropout=None, **kwargs
    ):
        super().__init__(**kwargs)
        self.attention = attention
        self.feedforward = feedforward
        self.attention_norm = attention_norm
        self.feedforward_norm = feedforward_norm
        self.dropout = dropout
        self.attention_dropout = dropout if attention_dropout is None else attention_dropout
        self.built = True

    def _dropout(self, x, rate, training):
        if training and rate:
            return torch.nn.functional.dropout(x, rate, training=True)
        return x

    def call(self, x, context, training=False):
        attended = self.attention.call(self.attention_norm.call(x), context, training=training)
        x = x + self._dropout(attended, self.attention_dropout, training)
        fed = self.feedforward.call(self.feedforward_norm.call(x))
        return x + self._dropout(fed, self.dropout, training)


class ParallelDecoderBlock(DecoderBlock):
    """``x + attention(norm(x)) + feedforward(norm'(x))``: both branches read the block's input.

    Without a ``feedforward_norm`` both read the one ``attention_norm`` (Falcon-7B);
    with one, each has its own (Falcon-40B's ``ln_attn`` and ``ln_mlp``). ``dropout``
    applies to the branches' sum.
    """

    def call(self, x, context, training=False):
        normed = self.attention_norm.call(x)  # [batch, seq, hidden]
        attended = self.attention.call(normed, context, training=training)
        fed = self.feedforward.call(normed if self.feedforward_norm is None else self.feedforward_norm.call(x))
        return x + self._dropout(attended + fed, self.dropout, training)
