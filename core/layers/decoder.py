"""The pre-norm transformer decoder block that Llama, Mistral and Phi-3 share."""

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
