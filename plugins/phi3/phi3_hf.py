"""Converts transformers' ``Phi3ForCausalLM`` checkpoints.

Phi-3 fuses the attention's query/key/value projections (``qkv_proj``) and the
feed-forward's gate/up projections (``gate_up_proj``); they are split into
KerasHub's separate kernels here.
"""

from lmq.core.presets.transformers_import import rope_settings
from lmq.plugins.llama.llama_hf import decoder_config


def backbone_config(hf_config):
    """transformers' config.json -> Phi3Backbone's arguments (longrope, older "su", becomes "su")."""
    for flag in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if hf_config.get(flag):
            raise ValueError(f"config.json: {flag}=true is unsupported by Phi3Backbone.")
    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim != hf_config["hidden_size"] // heads:
        raise ValueError(f"config.json: head_dim={head_dim} != hidden_size / num_attention_heads is unsupported.")
    theta, rope_type, rope = rope_settings(hf_config)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is unsupported by Phi3Backbone.")
    max_length = hf_config.get("max_position_embeddings", 4096)
    original = rope.get("original_max_position_embeddings") or hf_config.get("original_max_position_embeddings", max_length)
    config = {
        **decoder_config(hf_config),
        "max_sequence_length": max_length,
        "pretraining_sequence_length": original,
        "rope_max_wavelength": theta or 10000.0,
        "sliding_window": hf_config.get("sliding_window"),
    }
    if rope_type in ("longrope", "su"):
        for key in ("factor", "attention_factor"):
            if rope.get(key) is not None:  # transformers would use it instead of the lengths' ratio
                raise ValueError(f"config.json: rope {key} is unsupported (the lengths' ratio sets the scaling).")
        config.update(
            rope_scaling_type="su",
            rope_scaling_short_factor=list(rope["short_factor"]),
            rope_scaling_long_factor=list(rope["long_factor"]),
        )
    elif rope_type != "default":
        raise ValueError(f"Unsupported rope scaling {rope_type!r} in this checkpoint's config.json.")
    return config


def convert_weights(backbone, checkpoint):
    """Splits each layer's fused tensors once and copies every piece into its kernel."""
    hidden, head_dim, ffn = backbone.hidden_dim, backbone.head_dim, backbone.intermediate_dim
    query_rows = backbone.num_query_heads * head_dim
    kv_rows = backbone.num_key_value_heads * head_dim

    def heads(start, rows):  # rows [start, start + rows) of [out, hidden] -> [hidden, heads, head_dim]
        return lambda w: w[start : start + rows].T.reshape(hidden, -1, head_dim)

    checkpoint.assign(backbone.token_embedding.embeddings, "model.embed_tokens.weight")
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"model.layers.{i}"
        attention, feedforward = block.attention, block.feedforward
        qkv = f"{prefix}.self_attn.qkv_proj.weight"
        checkpoint.assign(attention.query_kernel, qkv, heads(0, query_rows))
        checkpoint.assign(attention.key_kernel, qkv, heads(query_rows, kv_rows))
        checkpoint.assign(attention.value_kernel, qkv, heads(query_rows + kv_rows, kv_rows))
        checkpoint.assign(
            attention.output_kernel, f"{prefix}.self_attn.o_proj.weight", lambda w: w.T.reshape(-1, head_dim, hidden)
        )
        gate_up = f"{prefix}.mlp.gate_up_proj.weight"  # gate rows first, then up
        checkpoint.assign(feedforward.gate_kernel, gate_up, lambda w: w[:ffn].T)
        checkpoint.assign(feedforward.intermediate_kernel, gate_up, lambda w: w[ffn:].T)
        checkpoint.assign(feedforward.output_kernel, f"{prefix}.mlp.down_proj.weight", lambda w: w.T)
        checkpoint.assign(block.attention_norm.scale, f"{prefix}.input_layernorm.weight")
        checkpoint.assign(block.feedforward_norm.scale, f"{prefix}.post_attention_layernorm.weight")
    checkpoint.assign(backbone.layer_norm.scale, "model.norm.weight")
    checkpoint.assign(backbone.token_embedding.reverse_embeddings, "lm_head.weight", lambda w: w.T)
