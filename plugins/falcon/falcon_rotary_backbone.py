"""FalconRotaryBackbone: the Falcon-7B and Falcon-40B/180B layouts, which KerasHub has no class for."""

from lmq.core.layers import CachedAttention, DecoderBlock, ParallelDecoderBlock, ReversibleEmbedding, RotaryEmbedding
from lmq.core.layers.feedforward import FeedForward
from lmq.core.layers.norms import LayerNorm
from lmq.core.models.backbone import DecoderOnlyBackbone
from lmq.plugins.falcon.falcon_backbone import falcon_quantized_layers, falcon_weights


class FalconRotaryBackbone(DecoderOnlyBackbone):
    """Falcon with rotary embeddings: LayerNorm pre-norm blocks of attention with
    ``num_kv_heads`` key/value heads (1: Falcon-7B's multi-query) and a GELU MLP.

    ``num_layer_norms`` says how a block reads its input: 1, attention and MLP in
    parallel after one norm (Falcon-7B); 2 with ``parallel_attention``, in parallel
    after a norm each (Falcon-40B's ``ln_attn``/``ln_mlp``); 2 without it, one after
    the other, each after its own norm.
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_attention_heads",
        "num_kv_heads",
        "hidden_dim",
        "intermediate_dim",
        "num_layer_norms",
        "parallel_attention",
        "use_bias",
        "tie_word_embeddings",
        "rope_max_wavelength",
        "layer_norm_epsilon",
        "attention_dropout_rate",
        "feedforward_dropout_rate",
    )

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_attention_heads,
        num_kv_heads,
        hidden_dim,
        intermediate_dim,
        num_layer_norms=1,
        parallel_attention=True,
        use_bias=False,
        tie_word_embeddings=True,
        rope_max_wavelength=10000,
        layer_norm_epsilon=1e-5,
        attention_dropout_rate=0,
        feedforward_dropout_rate=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_layer_norms not in (1, 2) or (num_layer_norms == 1 and not parallel_attention):
            raise ValueError(
                f"FalconRotaryBackbone: num_layer_norms={num_layer_norms} with parallel_attention="
                f"{parallel_attention} is no Falcon layout (1 norm needs parallel attention; 2 norms either way)."
            )
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.num_kv_heads = num_kv_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_layer_norms = num_layer_norms
        self.parallel_attention = parallel_attention
        self.use_bias = use_bias
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_max_wavelength = rope_max_wavelength
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_dropout_rate = attention_dropout_rate
        self.feedforward_dropout_rate = feedforward_dropout_rate
        self.num_key_value_heads = num_kv_heads
        self.head_dim = hidden_dim // num_attention_heads
        self.rotary = RotaryEmbedding(self.head_dim, max_wavelength=rope_max_wavelength)

        policy = self.dtype_policy
        block_cls = ParallelDecoderBlock if parallel_attention else DecoderBlock

        def norm():
            return LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy)

        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_dim, tie_weights=tie_word_embeddings, dtype=policy, name="token_embedding"
        )
        self.transformer_layers = [
            block_cls(
                attention=CachedAttention(
                    hidden_dim,
                    num_attention_heads,
                    num_kv_heads,
                    use_bias=use_bias,
                    dropout=attention_dropout_rate,
                    cache_index=i,
                    flat_output_kernel=True,
                    dtype=policy,
                ),
                feedforward=FeedForward(hidden_dim, intermediate_dim, "gelu", use_bias=use_bias, dtype=policy),
                attention_norm=norm(),
                feedforward_norm=norm() if num_layer_norms == 2 else None,
                dropout=feedforward_dropout_rate,
                attention_dropout=attention_dropout_rate,
                dtype=policy,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy, name="final_layernorm")
        self.built = True

    def keras_hub_weights(self):
        """KerasHub's FalconBackbone layout; a block's second norm is ``post_attention_layernorm``
        one after the other, ``mlp_layernorm`` in parallel."""
        return falcon_weights(self, "mlp_layernorm" if self.parallel_attention else "post_attention_layernorm")

    def keras_hub_quantized_layers(self):
        return falcon_quantized_layers(self)
