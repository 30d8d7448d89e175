"""Converts transformers' ``LlamaForCausalLM`` checkpoints: the Llama family's checkpoint layout,
which Mistral's converter shares (and Phi-3's, for the config).

Unlike KerasHub 0.32's converter, ``rms_norm_eps`` is honoured (transformers is the reference).
"""

from lmq.core.presets.transformers_import import rope_settings


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


def decoder_config(hf_config):
    """The settings every Llama-family checkpoint (Llama, Mistral, Phi-3) has -> KerasHub's backbone arguments."""
    heads = hf_config["num_attention_heads"]
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_query_heads": heads,
        "hidden_dim": hf_config["hidden_size"],
        "intermediate_dim": hf_config["intermediate_size"],
        "num_key_value_heads": hf_config.get("num_key_value_heads") or heads,
        "layer_norm_epsilon": hf_config.get("rms_norm_eps", 1e-6),
    }


def convert_weights(backbone, checkpoint):
    """The Llama layout (Llama, Mistral): q/k/v/o, gate/up/down, two norms per layer."""
    hidden = backbone.hidden_dim

    def heads(num_heads):  # [heads * head_dim, hidden] -> [hidden, heads, head_dim]
        return lambda w: w.T.reshape(hidden, num_heads, -1)

    def transpose(w):
        return w.T

    checkpoint.assign(backbone.token_embedding.embeddings, "model.embed_tokens.weight")
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}"
        attention, feedforward = block.attention, block.feedforward
        query_heads, kv_heads = attention.num_query_heads, attention.num_key_value_heads
        checkpoint.assign(attention.query_kernel, f"{prefix}.self_attn.q_proj.weight", heads(query_heads))
        checkpoint.assign(attention.key_kernel, f"{prefix}.self_attn.k_proj.weight", heads(kv_heads))
        checkpoint.assign(attention.value_kernel, f"{prefix}.self_attn.v_proj.weight", heads(kv_heads))
        checkpoint.assign(
            attention.output_kernel,
            f"{prefix}.self_attn.o_proj.weight",
            lambda w: w.T.reshape(query_heads, -1, hidden),
        )
        checkpoint.assign(feedforward.gate_kernel, f"{prefix}.mlp.gate_proj.weight", transpose)
        checkpoint.assign(feedforward.intermediate_kernel, f"{prefix}.mlp.up_proj.weight", transpose)
        checkpoint.assign(feedforward.output_kernel, f"{prefix}.mlp.down_proj.weight", transpose)
        checkpoint.assign(block.attention_norm.scale, f"{prefix}.input_layernorm.weight")
        checkpoint.assign(block.feedforward_norm.scale, f"{prefix}.post_attention_layernorm.weight")
    checkpoint.assign(backbone.layer_norm.scale, "model.norm.weight")
    if backbone.token_embedding.reverse_embeddings is not None:
        checkpoint.assign(backbone.token_embedding.reverse_embeddings, "lm_head.weight", transpose)
