"""MistralBackbone: KerasHub's arguments and defaults on lmq's shared decoder blocks."""

from core.layers import RotaryEmbedding
from core.models.backbone import LLAMA_STYLE_LAYOUT, DecoderOnlyBackbone

# KerasHub's config.json keys, in its order: the constructor's arguments, each kept as
# the attribute of that name (``head_dim`` as resolved, which KerasHub reads the same).
KERAS_HUB_CONFIG = (
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


class MistralBackbone(DecoderOnlyBackbone):
    """Mistral 7B: Llama's decoder whose attention sees only the last ``sliding_window`` positions.

    ``rope_scaling_factor`` is linear position scaling; ``head_dim`` defaults to
    ``hidden_dim // num_query_heads``; ``sliding_window=None`` attends to every
    position (transformers' checkpoints of Mistral v0.2 onwards).
    """

    keras_hub_layout = {
        **LLAMA_STYLE_LAYOUT,
        "block": "mistral_transformer_decoder",
        "final_norm": "mistral_layer_normalization",
    }

    def __init__(
        self,
        vocabulary_size, num_layers, num_query_heads, hidden_dim, intermediate_dim, num_key_value_heads,
        rope_max_wavelength=10000, rope_scaling_factor=1.0, layer_norm_epsilon=1e-6,
        sliding_window=512, head_dim=None, dropout=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        arguments = locals()  # the constructor's arguments by name
        for name in KERAS_HUB_CONFIG:
            setattr(self, name, arguments[name])
        self.head_dim = head_dim or hidden_dim // num_query_heads
        self.rotary = RotaryEmbedding(
            self.head_dim, max_wavelength=rope_max_wavelength, position_scaling_factor=rope_scaling_factor
        )
        self.build_llama_style_layers()
        self.built = True

    def get_config(self):
        return {**self.base_config(), **{name: getattr(self, name) for name in KERAS_HUB_CONFIG}}
