"""FalconBackbone: KerasHub's arguments and defaults on lmq's shared decoder blocks."""

from lmq.core.layers import CachedAttention, DecoderBlock, ReversibleEmbedding
from lmq.core.layers.alibi import alibi_mask, alibi_slopes
from lmq.core.layers.feedforward import FeedForward
from lmq.core.layers.norms import LayerNorm
from lmq.core.models.backbone import DecoderOnlyBackbone, keras_weight_paths, numbered


class FalconBackbone(DecoderOnlyBackbone):
    """Falcon-RW (falcon-rw-1b): LayerNorm pre-norm blocks of multi-head attention with
    biases and ALiBi, then a GELU MLP; the embedding doubles as the head.

    Unlike KerasHub 0.32, whose cached decoding drops the ALiBi bias after the
    prompt, every decode step keeps it, as transformers does.
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_attention_heads",
        "hidden_dim",
        "intermediate_dim",
        "attention_dropout_rate",
        "feedforward_dropout_rate",
        "layer_norm_epsilon",
    )

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_attention_heads,
        hidden_dim,
        intermediate_dim,
        layer_norm_epsilon=1e-5,
        attention_dropout_rate=0,
        feedforward_dropout_rate=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.layer_norm_epsilon = layer_norm_epsilon
        self.attention_dropout_rate = attention_dropout_rate
        self.feedforward_dropout_rate = feedforward_dropout_rate
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_dim // num_attention_heads
        self._alibi_slopes = {}  # device -> [heads]

        policy = self.dtype_policy
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_dim, tie_weights=True, dtype=policy, name="token_embedding"
        )
        self.transformer_layers = [
            DecoderBlock(
                attention=CachedAttention(
                    hidden_dim,
                    num_attention_heads,
                    num_attention_heads,
                    use_bias=True,
                    dropout=attention_dropout_rate,
                    cache_index=i,
                    flat_output_kernel=True,
                    dtype=policy,
                ),
                feedforward=FeedForward(hidden_dim, intermediate_dim, "gelu", dtype=policy),
                attention_norm=LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy),
                feedforward_norm=LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy),
                dropout=feedforward_dropout_rate,
                attention_dropout=attention_dropout_rate,
                dtype=policy,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = LayerNorm(hidden_dim, layer_norm_epsilon, dtype=policy, name="final_layernorm")
        self.built = True

    key_position_bias = True

    def biased(self, allowed, key_positions):
        """ALiBi folded into an additive mask [batch, heads, queries, keys]."""
        device = str(key_positions.device)
        if device not in self._alibi_slopes:
            self._alibi_slopes[device] = alibi_slopes(self.num_attention_heads).to(key_positions.device)
        dtype = self.token_embedding.output_dtype
        return alibi_mask(self._alibi_slopes[device], key_positions, allowed, self.head_dim, dtype)

    def keras_hub_weights(self):
        return falcon_weights(self)

    def keras_hub_quantized_layers(self):
        return falcon_quantized_layers(self)


def falcon_quantized_layers(backbone):
    """KerasHub's FalconBackbone paths of the layers an int8 preset quantizes (its ``DTypePolicyMap`` keys)."""
    paths = ["token_embedding"]
    for index in range(len(backbone.transformer_layers)):
        block = f"transformer_layer_{index}"
        paths += [f"{block}/attention/{name}_dense" for name in ("query", "key", "value", "output")]
        paths += [f"{block}/dense_h_to_4h", f"{block}/dense_4h_to_h"]
    return paths


def falcon_weights(backbone, second_norm="post_attention_layernorm"):
    """KerasHub's FalconBackbone layout of ``model.weights.h5``: every kernel with its bias
    (when there is one), norms with gamma and beta; ``second_norm`` names a block's MLP norm."""

    def dense(kernel, bias):
        return (kernel,) if bias is None else (kernel, bias)

    layers = {"reversible_embedding": backbone.token_embedding.variables}  # the head's own matrix too, if untied
    for index, block in enumerate(backbone.transformer_layers):
        prefix = numbered("falcon_transformer_decoder", index)
        attention, feedforward = block.attention, block.feedforward
        layers.update({
            f"{prefix}/attention_layer/query_dense": dense(attention.query_kernel, attention.query_bias),
            f"{prefix}/attention_layer/key_dense": dense(attention.key_kernel, attention.key_bias),
            f"{prefix}/attention_layer/value_dense": dense(attention.value_kernel, attention.value_bias),
            f"{prefix}/attention_layer/output_dense": dense(attention.output_kernel, attention.output_bias),
            f"{prefix}/input_layernorm": (block.attention_norm.gamma, block.attention_norm.beta),
            f"{prefix}/dense_h_to_4h": dense(feedforward.intermediate_kernel, feedforward.intermediate_bias),
            f"{prefix}/dense_4h_to_h": dense(feedforward.output_kernel, feedforward.output_bias),
        })
        if block.feedforward_norm is not None:
            layers[f"{prefix}/{second_norm}"] = (block.feedforward_norm.gamma, block.feedforward_norm.beta)
    layers["layer_normalization"] = (backbone.layer_norm.gamma, backbone.layer_norm.beta)
    return keras_weight_paths(layers)
