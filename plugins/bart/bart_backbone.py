"""BartBackbone: KerasHub's arguments and weight layout on lmq's shared blocks."""

import torch

from lmq.core.layers import (
    AttentionContext,
    CachedAttention,
    CrossAttentionDecoderBlock,
    EncoderBlock,
    EncoderMemory,
    FeedForward,
    KVCache,
    LayerNorm,
    PositionEmbedding,
    ReversibleEmbedding,
    Seq2SeqCache,
)
from lmq.core.layers.encoder_decoder import additive_mask
from lmq.core.models.backbone import Backbone, keras_weight_paths, numbered

LAYER_NORM_EPSILON = 1e-5


class BartBackbone(Backbone):
    """Bart: a post-norm encoder and decoder of ``num_layers`` each, sharing one token
    embedding (also the head), with learned positions and a norm over each side's embeddings.

    ``call`` takes ``encoder_token_ids``, ``encoder_padding_mask``, ``decoder_token_ids``,
    ``decoder_padding_mask`` and returns ``encoder_sequence_output`` and
    ``decoder_sequence_output``, as KerasHub's does. Generation uses ``encode``,
    ``new_cache``, ``prefill`` and ``decode``.
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_heads",
        "hidden_dim",
        "intermediate_dim",
        "dropout",
        "max_sequence_length",
    )

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        dropout=0.1,
        max_sequence_length=1024,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.max_sequence_length = max_sequence_length
        self.head_dim = hidden_dim // num_heads

        policy = self.dtype_policy

        def attention(i):
            return CachedAttention(
                hidden_dim, num_heads, num_heads, use_bias=True, dropout=dropout, cache_index=i, dtype=policy
            )

        def norm():
            return LayerNorm(hidden_dim, LAYER_NORM_EPSILON, dtype=policy)

        def feedforward():
            return FeedForward(hidden_dim, intermediate_dim, "gelu", dtype=policy)

        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_dim, tie_weights=True, dtype=policy, name="token_embedding"
        )
        self.encoder_position_embedding = PositionEmbedding(max_sequence_length, hidden_dim, dtype=policy)
        self.decoder_position_embedding = PositionEmbedding(max_sequence_length, hidden_dim, dtype=policy)
        self.encoder_embeddings_layer_norm = norm()
        self.decoder_embeddings_layer_norm = norm()
        self.encoder_transformer_layers = [
            EncoderBlock(attention(i), feedforward(), norm(), norm(), dropout=dropout, dtype=policy)
            for i in range(num_layers)
        ]
        self.decoder_transformer_layers = [
            CrossAttentionDecoderBlock(
                attention(i), attention(i), feedforward(), norm(), norm(), norm(), dropout=dropout, dtype=policy
            )
            for i in range(num_layers)
        ]
        self.built = True

    # -- the forward pass -------------------------------------------------------------

    def call(self, inputs, training=False):
        as_tensor = lambda key, dtype: torch.as_tensor(inputs[key], device=self.device).to(dtype)  # noqa: E731
        encoder_ids, decoder_ids = as_tensor("encoder_token_ids", torch.long), as_tensor("decoder_token_ids", torch.long)
        encoder_mask = as_tensor("encoder_padding_mask", torch.bool)
        decoder_mask = as_tensor("decoder_padding_mask", torch.bool)
        encoder_output = self.encode(encoder_ids, encoder_mask, training=training)
        memory = EncoderMemory.of(self.decoder_transformer_layers, encoder_output, encoder_mask)
        batch, length = decoder_ids.shape
        self.decoder_position_embedding.check(length)
        positions = torch.arange(length, device=self.device).expand(batch, length)
        causal = positions[:, None, :, None] >= positions[:, None, None, :]  # [batch, 1, query, key]
        mask = causal & decoder_mask[:, None, None, :]
        mask = mask | ~mask.any(dim=-1, keepdim=True)  # a query with no key attends to all, not NaN
        context = AttentionContext(mask=additive_mask(mask, encoder_output.dtype))
        decoder_output = self._decoder(decoder_ids, positions, context, memory, training)
        return {"encoder_sequence_output": encoder_output, "decoder_sequence_output": decoder_output}

    def encode(self, token_ids, padding_mask, training=False):
        """Encoder token ids and padding mask [batch, length] -> encoder output [batch, length, hidden]."""
        batch, length = token_ids.shape
        self.encoder_position_embedding.check(length)
        positions = torch.arange(length, device=token_ids.device).expand(batch, length)
        x = self.token_embedding.call(token_ids) + self.encoder_position_embedding.call(positions)
        x = self._embedding_dropout(self.encoder_embeddings_layer_norm.call(x), training)
        context = AttentionContext(mask=additive_mask(padding_mask[:, None, None, :].bool(), x.dtype))
        for block in self.encoder_transformer_layers:
            x = block.call(x, context, training=training)
        return x

    def _decoder(self, token_ids, positions, context, memory, training=False):
        """Decoder tokens at ``positions`` [batch, seq] -> decoder output [batch, seq, hidden]."""
        x = self.token_embedding.call(token_ids) + self.decoder_position_embedding.call(positions)
        x = self._embedding_dropout(self.decoder_embeddings_layer_norm.call(x), training)
        for layer, block in enumerate(self.decoder_transformer_layers):
            x = block.call(x, context, memory, layer, training=training)
        return x

    def _embedding_dropout(self, x, training):
        return torch.nn.functional.dropout(x, self.dropout, training=True) if training and self.dropout else x

    # -- generation -------------------------------------------------------------------

    def new_cache(self, batch_size, max_length, encoder_length, rows_per_request=1):
        """A ``Seq2SeqCache``: decoder keys/values of ``max_length`` positions for ``batch_size``
        rows, and the encoder's keys/values of up to ``encoder_length`` positions for their
        requests (``rows_per_request`` rows each: beams share their request's)."""
        embeddings = self.token_embedding.embeddings.value
        dtype = self.token_embedding.output_dtype
        shape = (self.num_layers, batch_size, self.num_heads)
        return Seq2SeqCache(
            KVCache(*shape, max_length, self.head_dim, dtype, embeddings.device),
            EncoderMemory.empty(*shape, encoder_length, self.head_dim, dtype, embeddings.device, rows_per_request),
        )

    def prefill(self, encoder_ids, encoder_mask, decoder_ids, cache, rows):
        """Encodes the inputs of the requests whose first rows are ``rows`` into ``cache.memory``
        and runs their right-padded decoder prompts [batch, seq] into the decoder cache;
        returns the decoder output."""
        encoder_output = self.encode(encoder_ids, encoder_mask)
        memory = EncoderMemory.of(self.decoder_transformer_layers, encoder_output, encoder_mask)
        cache.memory.write(rows, memory)
        batch, length = decoder_ids.shape
        self.decoder_position_embedding.check(length)
        positions = torch.arange(length, device=decoder_ids.device).expand(batch, length)
        context = AttentionContext(is_causal=True, cache=cache, cache_rows=rows)
        return self._decoder(decoder_ids, positions, context, memory)

    def decode(self, token_ids, positions, cache, key_length):
        """One decoder token per row [batch, 1] at ``positions`` [batch] -> [batch, 1, hidden].

        Rows at one position (Bart's prompts are its two start tokens, so usually all of
        them) attend to every cached key and need no mask."""
        slots, key_length, key_positions = cache.step(positions, key_length)
        query_positions = positions[:, None]
        mask = None
        if int(positions.min()) + 1 != key_length:
            mask = query_positions[:, None, :, None] >= key_positions[:, None, None, :]
            mask = additive_mask(mask, cache.memory.keys.dtype)
        context = AttentionContext(mask=mask, cache=cache, write_positions=slots, key_length=key_length)
        return self._decoder(token_ids, query_positions, context, cache.memory.first(len(positions)))

    # -- KerasHub's layout ------------------------------------------------------------

    def keras_hub_weights(self):
        """KerasHub's ``model.weights.h5``: the encoder's layers first, then the decoder's."""

        def attention(a):
            return {
                "query_dense": (a.query_kernel, a.query_bias),
                "key_dense": (a.key_kernel, a.key_bias),
                "value_dense": (a.value_kernel, a.value_bias),
                "output_dense": (a.output_kernel, a.output_bias),
            }

        def norm(n):
            return (n.gamma, n.beta)

        def common(prefix, block):
            ff = block.feedforward
            layers = {f"{prefix}/_self_attention_layer/{k}": v for k, v in attention(block.attention).items()}
            layers.update({
                f"{prefix}/_self_attention_layer_norm": norm(block.attention_norm),
                f"{prefix}/_feedforward_layer_norm": norm(block.feedforward_norm),
                f"{prefix}/_feedforward_intermediate_dense": (ff.intermediate_kernel, ff.intermediate_bias),
                f"{prefix}/_feedforward_output_dense": (ff.output_kernel, ff.output_bias),
            })
            return layers

        layers = {
            "reversible_embedding": (self.token_embedding.embeddings,),
            "position_embedding": (self.encoder_position_embedding.embeddings,),
            "position_embedding_1": (self.decoder_position_embedding.embeddings,),
            "layer_normalization": norm(self.encoder_embeddings_layer_norm),
            "layer_normalization_1": norm(self.decoder_embeddings_layer_norm),
        }
        for index, block in enumerate(self.encoder_transformer_layers):
            layers.update(common(numbered("transformer_encoder", index), block))
        for index, block in enumerate(self.decoder_transformer_layers):
            prefix = numbered("transformer_decoder", index)
            layers.update(common(prefix, block))
            layers.update({f"{prefix}/_cross_attention_layer/{k}": v for k, v in attention(block.cross_attention).items()})
            layers[f"{prefix}/_cross_attention_layer_norm"] = norm(block.cross_attention_norm)
        return keras_weight_paths(layers)

    def keras_hub_quantized_layers(self):
        """KerasHub's BartBackbone paths of the layers an int8 preset quantizes (its ``DTypePolicyMap`` keys)."""
        projections = ("query", "key", "value", "attention_output")
        feedforward = ("feedforward_intermediate_dense", "feedforward_output_dense")
        paths = ["token_embedding"]
        for index in range(len(self.encoder_transformer_layers)):
            block = f"transformer_encoder_layer_{index}"
            paths += [f"{block}/self_attention_layer/{name}" for name in projections]
            paths += [f"{block}/{name}" for name in feedforward]
        for index in range(len(self.decoder_transformer_layers)):
            block = f"transformer_decoder_layer_{index}"
            for attention in ("self_attention", "cross_attention"):
                paths += [f"{block}/{attention}/{name}" for name in projections]
            paths += [f"{block}/{name}" for name in feedforward]
        return paths
