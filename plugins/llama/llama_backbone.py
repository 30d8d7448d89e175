"""LlamaBackbone: KerasHub's arguments and defaults on lmq's shared decoder blocks."""

from core.layers import RotaryEmbedding
from core.models.backbone import LLAMA_STYLE_LAYOUT, DecoderOnlyBackbone


class LlamaBackbone(DecoderOnlyBackbone):
    """Llama 2 / 3 / 3.1: RMSNorm, grouped-query attention with RoPE, SwiGLU.

    ``rope_position_scaling_factor`` is linear position scaling; the four
    ``rope_frequency_adjustment_factor`` / ``rope_low_freq_factor`` /
    ``rope_high_freq_factor`` / ``rope_pretraining_sequence_length`` arguments are
    Llama 3.1's frequency scaling.
    """

    keras_hub_layout = {
        **LLAMA_STYLE_LAYOUT,
        "block": "llama_transformer_decoder",
        "final_norm": "llama_layer_norm",
    }

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
        self.build_llama_style_layers(tie_word_embeddings)
        self.built = True

    def get_config(self):
        config = {
            **self.base_config(),
            "vocabulary_size": self.vocabulary_size,
            "num_layers": self.num_layers,
            "num_query_heads": self.num_query_heads,
            "hidden_dim": self.hidden_dim,
            "intermediate_dim": self.intermediate_dim,
            "rope_max_wavelength": self.rope_max_wavelength,
            "rope_position_scaling_factor": self.rope_position_scaling_factor,
            "rope_frequency_adjustment_factor": self.rope_frequency_adjustment_factor,
            "rope_low_freq_factor": self.rope_low_freq_factor,
            "rope_high_freq_factor": self.rope_high_freq_factor,
            "rope_pretraining_sequence_length": self.rope_pretraining_sequence_length,
            "num_key_value_heads": self.num_key_value_heads,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "dropout": self.dropout,
        }
        if self.tie_word_embeddings:  # KerasHub 0.32's LlamaBackbone has no such argument
            config["tie_word_embeddings"] = True
        return config
