"""Token embedding that doubles as the language-model head."""

import keras
import torch

from lmq.core.layers.projection import Projections, project
from lmq.core.quantization import Int8Kernel, check_mode, quantize_matrix, scale_of


class ReversibleEmbedding(Projections):
    """``call`` maps token ids to vectors; ``reverse`` maps hidden states to logits.

    With ``tie_weights`` the head is the transposed embedding matrix; otherwise it
    has its own ``reverse_embeddings`` [hidden, vocab], as in KerasHub. ``quantize("int8")``
    is KerasHub's: int8 ``embeddings`` with one scale per token, int8 ``reverse_embeddings``
    with one per vocabulary column, and ``reverse`` quantizes the hidden states per token.
    """

    kernels = {"embeddings": 1, "reverse_embeddings": 1}

    def __init__(self, vocabulary_size, hidden_dim, tie_weights=True, initializer=None, **kwargs):
        super().__init__(**kwargs)
        initializer = initializer or keras.initializers.RandomNormal(stddev=0.02)
        self.tie_weights = tie_weights
        self.embeddings = self.add_weight(
            shape=(vocabulary_size, hidden_dim), initializer=initializer, name="embeddings"
        )
        self.reverse_embeddings = None
        if not tie_weights:
            self.reverse_embeddings = self.add_weight(
                shape=(hidden_dim, vocabulary_size),
                initializer=initializer,
                name="reverse_embeddings",
            )
        self.built = True

    @property
    def output_dtype(self):
        """The float dtype of what ``call`` returns (an int8 table's scales are in it)."""
        scale = scale_of(self.embeddings)
        return (self.embeddings if scale is None else scale).value.dtype

    def call(self, token_ids):
        rows = torch.nn.functional.embedding(token_ids, self.embeddings.value)
        scale = scale_of(self.embeddings)
        if scale is None:
            return rows
        return rows.to(scale.value.dtype) / scale.value[token_ids][..., None]

    def reverse(self, hidden):
        if not self.tie_weights:
            return project(hidden, self.serving_kernel("reverse_embeddings", hidden))
        scale = scale_of(self.embeddings)
        if scale is None:
            return project(hidden, self.serving_kernel("embeddings", hidden, self.embeddings.value.T))
        return project(hidden, Int8Kernel(self.embeddings.value.T, scale.value))

    def quantize(self, mode, config=None):  # Keras' quantize wrapper passes config
        """Keras' int8 ``ReversibleEmbedding``: the table per token row (axis -1), the
        untied head per vocabulary column (axis 0)."""
        check_mode(mode)
        for name, axis in (("embeddings", -1), ("reverse_embeddings", 0))[: len(self.kernel_names())]:
            variable = getattr(self, name)
            values, scale = quantize_matrix(variable.value, axis=axis)
            delattr(self, name)
            setattr(self, name, self._int8_kernel(name, variable.shape, variable.dtype, values, scale))

    def scale_shape(self, name, shape):
        """Keras' ``embeddings_scale`` [vocab] (per row), ``reverse_embeddings_scale`` [vocab] (per column)."""
        return (shape[0],) if name == "embeddings" else (shape[1],)


class PositionEmbedding(keras.layers.Layer):
    """Learned absolute positions (Bart): ``embeddings`` [sequence_length, hidden], one row per position."""

    def __init__(self, sequence_length, hidden_dim, initializer=None, **kwargs):
        super().__init__(**kwargs)
        initializer = initializer or keras.initializers.RandomNormal(stddev=0.02)
        self.sequence_length = sequence_length
        self.embeddings = self.add_weight(
            shape=(sequence_length, hidden_dim), initializer=initializer, name="embeddings"
        )
        self.built = True

    def check(self, length):
        """Positions [0, ``length``) must be learned ones: checked on lengths, which are Python ints,
        so that no decode step reads a tensor back from the device to check its positions."""
        if length > self.sequence_length:
            raise ValueError(
                f"Position {length - 1} is beyond this model's {self.sequence_length} learned positions."
            )

    def call(self, positions):
        """Positions [batch, seq] (ints, checked by the caller: see ``check``) -> [batch, seq, hidden]."""
        return torch.nn.functional.embedding(positions, self.embeddings.value)
