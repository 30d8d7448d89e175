"""LlamaBackbone, and the Llama-family decoder that Llama, Mistral and Phi-3 share.

``LlamaStyleBackbone`` is that family in one place: RMSNorm pre-norm blocks of
grouped-query attention with RoPE and a SwiGLU feed-forward, and the layout of
their weights in KerasHub's ``model.weights.h5``. ``llama_hf`` holds the family's
transformers checkpoint layout.
"""

from lmq.core.layers import CachedAttention, DecoderBlock, GatedFeedForward, ReversibleEmbedding, RMSNorm, RotaryEmbedding
from lmq.core.models.backbone import DecoderOnlyBackbone, keras_weight_paths, numbered

# KerasHub's attribute names inside its Llama and Mistral decoder layers.
LLAMA_LAYOUT = {
    "attention": "_self_attention_layer",
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "output": "_output_dense",
    "attention_norm": "_self_attention_layernorm",
    "feedforward_norm": "_feedforward_layernorm",
    "gate": "_feedforward_gate_dense",
    "intermediate": "_feedforward_intermediate_dense",
    "feedforward_output": "_feedforward_output_dense",
}


class LlamaStyleBackbone(DecoderOnlyBackbone, abstract=True):
    """The Llama family. A subclass keeps its config, builds ``rotary``, then calls
    ``build_layers``; ``keras_hub_layout`` names its layers in KerasHub's weight file
    (``LLAMA_LAYOUT`` plus its ``block`` and ``final_norm``)."""

    def build_layers(self, tie_word_embeddings=False):
        """Reads the config attributes ``vocabulary_size``, ``num_layers``, ``num_query_heads``,
        ``num_key_value_heads``, ``hidden_dim``, ``intermediate_dim``, ``layer_norm_epsilon``,
        ``dropout``, and ``head_dim`` (which the subclass sets)."""
        policy = self.dtype_policy
        self.token_embedding = ReversibleEmbedding(
            self.vocabulary_size, self.hidden_dim, tie_weights=tie_word_embeddings, dtype=policy, name="token_embedding"
        )
        self.transformer_layers = [
            DecoderBlock(
                attention=CachedAttention(
                    self.hidden_dim,
                    self.num_query_heads,
                    self.num_key_value_heads,
                    head_dim=self.head_dim,
                    dropout=self.dropout,
                    cache_index=i,
                    dtype=policy,
                ),
                feedforward=GatedFeedForward(self.hidden_dim, self.intermediate_dim, dtype=policy),
                attention_norm=RMSNorm(self.hidden_dim, self.layer_norm_epsilon, dtype=policy),
                feedforward_norm=RMSNorm(self.hidden_dim, self.layer_norm_epsilon, dtype=policy),
                dropout=self.dropout,
                dtype=policy,
                name=f"transformer_layer_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.layer_norm = RMSNorm(
            self.hidden_dim, self.layer_norm_epsilon, dtype=policy, name="sequence_output_layernorm"
        )
        self.built = True

    def keras_hub_weights(self):
        layout = self.keras_hub_layout
        layers = {"reversible_embedding": self.token_embedding.variables}  # the head's own matrix too, if untied
        for index, block in enumerate(self.transformer_layers):
            prefix = numbered(layout["block"], index)
            attention = f"{prefix}/{layout['attention']}"
            parts = {
                f"{attention}/{layout['query']}": block.attention.query_kernel,
                f"{attention}/{layout['key']}": block.attention.key_kernel,
                f"{attention}/{layout['value']}": block.attention.value_kernel,
                f"{attention}/{layout['output']}": block.attention.output_kernel,
                f"{prefix}/{layout['attention_norm']}": block.attention_norm.scale,
                f"{prefix}/{layout['feedforward_norm']}": block.feedforward_norm.scale,
                f"{prefix}/{layout['gate']}": block.feedforward.gate_kernel,
                f"{prefix}/{layout['intermediate']}": block.feedforward.intermediate_kernel,
                f"{prefix}/{layout['feedforward_output']}": block.feedforward.output_kernel,
            }
            layers.update({path: (variable,) for path, variable in parts.items()})
        layers[layout["final_norm"]] = (self.layer_norm.scale,)
        return keras_weight_paths(layers)

    def keras_hub_quantized_layers(self):
        """KerasHub's paths of the layers an int8 preset quantizes (its ``DTypePolicyMap`` keys):
        ``transformer_layer_0/self_attention/query`` ... (Phi-3: ``.../attention/query``)."""
        layout = self.keras_hub_layout
        attention = layout["attention"].strip("_").removesuffix("_layer")
        feedforward = [layout[part].strip("_") for part in ("feedforward_output", "gate", "intermediate")]
        paths = ["token_embedding"]
        for index in range(len(self.transformer_layers)):
            block = f"transformer_layer_{index}"
            paths += [f"{block}/{name}" for name in feedforward]
            paths += [f"{block}/{attention}/{name}" for name in ("attention_output", "value", "key", "query")]
        return paths

    @classmethod
    def check_class(cls):
        super().check_class()
        names = {*LLAMA_LAYOUT, "block", "final_norm"}
        if missing := sorted(names - set(getattr(cls, "keras_hub_layout", None) or {})):
            raise cls.contract_error(f"its keras_hub_layout names no {missing}")


class LlamaBackbone(LlamaStyleBackbone):
    """Llama 2 / 3 / 3.1: RMSNorm, grouped-query attention with RoPE, SwiGLU.

    ``rope_position_scaling_factor`` is linear position scaling; the four
    ``rope_frequency_adjustment_factor`` / ``rope_low_freq_factor`` /
    ``rope_high_freq_factor`` / ``rope_pretraining_sequence_length`` arguments are
    Llama 3.1's frequency scaling.
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_query_heads",
        "hidden_dim",
        "intermediate_dim",
        "rope_max_wavelength",
        "rope_position_scaling_factor",
        "rope_frequency_adjustment_factor",
        "rope_low_freq_factor",
        "rope_high_freq_factor",
        "rope_pretraining_sequence_length",
        "num_key_value_heads",
        "layer_norm_epsilon",
        "dropout",
    )
    extra_config = ("tie_word_embeddings",)  # KerasHub 0.32's LlamaBackbone has no such argument
    keras_hub_layout = {**LLAMA_LAYOUT, "block": "llama_transformer_decoder", "final_norm": "llama_layer_norm"}

    def __init__(
        self,
        vocabulary_size,
        num_layers,
        num_query_heads,
        hidden_dim,
        intermediate_dim,
        num_key_value_heads,
        rope_max_wavelength=10000,
        rope_position_scaling_factor=1.0,
        rope_frequency_adjustment_factor=None,
        rope_low_freq_factor=None,
        rope_high_freq_factor=None,
        rope_pretraining_sequence_length=None,
        layer_norm_epsilon=1e-6,
        dropout=0,
        tie_word_embeddings=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_position_scaling_factor = rope_position_scaling_factor
        self.rope_frequency_adjustment_factor = rope_frequency_adjustment_factor
        self.rope_low_freq_factor = rope_low_freq_factor
        self.rope_high_freq_factor = rope_high_freq_factor
        self.rope_pretraining_sequence_length = rope_pretraining_sequence_length
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.head_dim = hidden_dim // num_query_heads
        self.rotary = RotaryEmbedding(
            self.head_dim,
            max_wavelength=rope_max_wavelength,
            position_scaling_factor=rope_position_scaling_factor,
            frequency_adjustment_factor=rope_frequency_adjustment_factor,
            low_freq_factor=rope_low_freq_factor,
            high_freq_factor=rope_high_freq_factor,
            pretraining_sequence_length=rope_pretraining_sequence_length,
        )
        self.build_layers(tie_word_embeddings)
