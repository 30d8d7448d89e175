"""Token embedding that doubles as the language-model head."""

import keras
import torch


class ReversibleEmbedding(keras.layers.Layer):
    """``call`` maps token ids to vectors; ``reverse`` maps hidden states to logits.

    With ``tie_weights`` the head is the transposed embedding matrix; otherwise it
    has its own ``reverse_embeddings`` [hidden, vocab], as in KerasHub.
    """

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

    def call(self, token_ids):
        return torch.nn.functional.embedding(token_ids, self.embeddings.value)

    def reverse(self, hidden):
        if self.tie_weights:
            return hidden @ self.embeddings.value.T
        return hidden @ self.reverse_embeddings.value


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

    def call(self, positions):
        """Positions [batch, seq] (ints) -> [batch, seq, hidden]."""
        if positions.numel() and int(positions.max()) >= self.sequence_length:
            raise ValueError(
                f"Position {int(positions.max())} is beyond this model's {self.sequence_length} learned positions."
            )
        return torch.nn.functional.embedding(positions, self.embeddings.value)
