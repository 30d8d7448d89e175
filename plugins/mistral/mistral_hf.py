"""Converts transformers' ``MistralForCausalLM`` checkpoints (Llama's weight layout).

Unlike KerasHub 0.32's converter, which rounds every weight through float16, the
checkpoint's values are kept as they are (transformers is the reference).
"""

from lmq.core.presets.transformers_import import rope_settings
from lmq.plugins.llama.llama_hf import convert_weights, decoder_config

__all__ = ["backbone_config", "convert_weights"]


def backbone_config(hf_config):
    """transformers' config.json -> MistralBackbone's arguments.

    ``sliding_window`` is kept as given (null in v0.2 onwards: no window).
    """
    if hf_config.get("tie_word_embeddings"):
        raise ValueError("config.json: tie_word_embeddings=true is unsupported (MistralBackbone has its own head).")
    theta, rope_type, rope = rope_settings(hf_config)
    if rope_type not in ("default", "linear"):
        raise ValueError(f"Unsupported rope scaling {rope_type!r} in this checkpoint's config.json.")
    return {
        **decoder_config(hf_config),
        "rope_max_wavelength": theta,
        "rope_scaling_factor": rope["factor"] if rope_type == "linear" else 1.0,
        "sliding_window": hf_config.get("sliding_window"),
        "head_dim": hf_config.get("head_dim"),
    }
