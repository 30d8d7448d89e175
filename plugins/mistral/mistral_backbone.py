"""MistralBackbone: KerasHub's arguments and defaults on the Llama-family decoder."""

from lmq.core.layers import RotaryEmbedding
from lmq.plugins.llama.llama_backbone import LLAMA_LAYOUT, LlamaStyleBackbone


class MistralBackbone(LlamaStyleBackbone):
    """Mistral 7B: Llama's decoder whose attention sees only the last ``sliding_window`` positions.

    ``rope_scaling_factor`` is linear position scaling; ``head_dim`` defaults to
    ``hidden_dim // num_query_heads`` (and is saved resolved, as KerasHub reads it);
    ``sliding_window=None`` attends to every position (transformers' checkpoints of
    Mistral v0.2 onwards).
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_query_heads",
        "hidden_dim",
        "intermediate_dim",
        "rope_max_wavelength",
        "rope_scaling_factor",
        "num_key_value_heads",
        "sliding_window",
        "head_dim",
        "layer_norm_epsilon",
        "dropout",
    )
    keras_hub_layout = {
        **LLAMA_LAYOUT,
        "block": "mistral_transformer_decoder",
        "final_norm": "mistral_layer_normalization",
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
        rope_scaling_factor=1.0,
        layer_norm_epsilon=1e-6,
        sliding_window=512,
        head_dim=None,
        dropout=0,
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
        self.rope_scaling_factor = rope_scaling_factor
        self.layer_norm_epsilon = layer_norm_epsilon
        self.sliding_window = sliding_window
        self.head_dim = head_dim or hidden_dim // num_query_heads
        self.dropout = dropout
        self.rotary = RotaryEmbedding(
            self.head_dim, max_wavelength=rope_max_wavelength, position_scaling_factor=rope_scaling_factor
        )
        self.build_layers()
