"""MiniGPTBackbone: lmq's decoder stack, built from its shared layers."""

from lmq.plugins import (
    CachedAttention,
    DecoderBlock,
    DecoderOnlyBackbone,
    FeedForward,
    LayerNorm,
    ReversibleEmbedding,
    RotaryEmbedding,
    keras_weight_paths,
    numbered,
)


class MiniGPTBackbone(DecoderOnlyBackbone):
    """Token embedding (tied to the head) -> ``num_layers`` x [LayerNorm -> attention with
    biases and RoPE, LayerNorm -> GELU MLP] -> LayerNorm."""

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_heads",
        "hidden_dim",
        "intermediate_dim",
        "layer_norm_epsilon",
        "rope_max_wavelength",
        "dropout",
    )

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_heads,
        hidden_dim,
        intermediate_dim,
        layer_norm_epsilon=1e-5,
        rope_max_wavelength=10000,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.dropout = dropout
        self.num_key_value_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.rotary = RotaryEmbedding(self.head_dim, max_wavelength=rope_max_wavelength)

        policy = self.dtype_policy
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_dim, tie_weights=True, dtype=policy, name="token_embedding"
        )
        self.transformer_layers = [
            DecoderBlock(
                attention=CachedAttention(
                    hidden_dim, num_heads, num_heads, use_bias=True, dropout=dropout, cache_index=i, dtype=policy
                ),
                feedforward=FeedForward(hidden_dim, intermediate_dim, "gelu", dtype=policy),
                attention_norm=LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy),
                feedforward_norm=LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy),
                dropout=dropout,
                dtype=policy,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy, name="final_layernorm")
        self.built = True

    def keras_hub_weights(self):
        """The paths this architecture's ``model.weights.h5`` uses (its own: KerasHub has no MiniGPT)."""
        layers = {"reversible_embedding": (self.token_embedding.embeddings,)}
        for index, block in enumerate(self.transformer_layers):
            prefix = numbered("minigpt_decoder", index)
            attention, feedforward = block.attention, block.feedforward
            layers.update({
                f"{prefix}/attention_norm": (block.attention_norm.gamma, block.attention_norm.beta),
                f"{prefix}/attention/query": (attention.query_kernel, attention.query_bias),
                f"{prefix}/attention/key": (attention.key_kernel, attention.key_bias),
                f"{prefix}/attention/value": (attention.value_kernel, attention.value_bias),
                f"{prefix}/attention/output": (attention.output_kernel, attention.output_bias),
                f"{prefix}/mlp_norm": (block.feedforward_norm.gamma, block.feedforward_norm.beta),
                f"{prefix}/mlp/intermediate": (feedforward.intermediate_kernel, feedforward.intermediate_bias),
                f"{prefix}/mlp/output": (feedforward.output_kernel, feedforward.output_bias),
            })
        layers["final_layernorm"] = (self.layer_norm.gamma, self.layer_norm.beta)
        return keras_weight_paths(layers)
