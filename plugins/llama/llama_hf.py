"""Converts transformers' ``LlamaForCausalLM`` checkpoints.

Unlike KerasHub 0.32's converter, ``rms_norm_eps`` is honoured (transformers is the reference).
"""

from core.presets.transformers_import import convert_decoder_weights as convert_weights  # noqa: F401
from core.presets.transformers_import import decoder_config, rope_settings


def rope_arguments(hf_config):
    """transformers' rope settings (``rope_scaling`` or 5.x's ``rope_parameters``) -> KerasHub's."""
    theta, rope_type, rope = rope_settings(hf_config)
    arguments = {"rope_max_wavelength": theta}
    if rope_type == "linear":
        arguments["rope_position_scaling_factor"] = rope["factor"]
    elif rope_type == "llama3":
        arguments.update(
            rope_frequency_adjustment_factor=rope["factor"],
            rope_low_freq_factor=rope["low_freq_factor"],
            rope_high_freq_factor=rope["high_freq_factor"],
            rope_pretraining_sequence_length=rope["original_max_position_embeddings"],
        )
    elif rope_type != "default":
        raise ValueError(f"Unsupported rope scaling {rope_type!r} in this checkpoint's config.json.")
    return arguments


def check_unsupported(hf_config):
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != hf_config["hidden_size"] // heads:
        raise ValueError(f"config.json: head_dim={head_dim} != hidden_size / num_attention_heads is unsupported.")
    for flag in ("attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"config.json: {flag}=true is unsupported.")


def backbone_config(hf_config):
    check_unsupported(hf_config)
    return {
        **decoder_config(hf_config),
        "tie_word_embeddings": hf_config.get("tie_word_embeddings", False),
        **rope_arguments(hf_config),
    }


def tokenizer(directory):
    """The SentencePiece ``tokenizer.model`` if the checkpoint has one, else None."""
    from plugins.llama.llama_tokenizer import LlamaTokenizer

    path = directory / "tokenizer.model"
    return LlamaTokenizer(proto=path) if path.is_file() else None
