"""Converts transformers' ``FalconForCausalLM`` checkpoints of the Falcon-RW kind (falcon-rw-1b).

KerasHub's FalconBackbone has one layout: ALiBi, multi-head attention, biases,
attention then MLP each after its own LayerNorm, tied embeddings. Checkpoints of
any other kind (Falcon-7B/40B: rotary, multi-query, parallel attention) are refused.
"""

import json

# setting: (what that layout needs, transformers' default when config.json omits it)
SETTINGS = {
    "alibi": (True, False),
    "new_decoder_architecture": (False, False),
    "multi_query": (False, True),
    "parallel_attn": (False, True),
    "bias": (True, False),
    "activation": ("gelu", "gelu"),
    "tie_word_embeddings": (True, True),
}


def backbone_config(hf_config):
    for key, (required, default) in SETTINGS.items():
        value = hf_config.get(key, default)
        if value != required:
            raise ValueError(
                f"config.json: {key}={json.dumps(value)} is unsupported; FalconBackbone "
                f"(the falcon-rw-1b layout) needs {key}={json.dumps(required)}."
            )
    hidden = hf_config["hidden_size"]
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "hidden_dim": hidden,
        "intermediate_dim": hf_config.get("ffn_hidden_size") or 4 * hidden,
        "layer_norm_epsilon": hf_config.get("layer_norm_epsilon", 1e-5),
        "attention_dropout_rate": hf_config.get("attention_dropout", 0.0),
        "feedforward_dropout_rate": hf_config.get("hidden_dropout", 0.0),
    }


def convert_weights(backbone, checkpoint):
    """Splits each layer's fused ``query_key_value`` ([heads * (q, k, v) * head_dim, hidden])."""
    heads, hidden = backbone.num_attention_heads, backbone.hidden_dim

    def fused(part):  # 0: query, 1: key, 2: value
        def kernel(w):  # [heads * 3 * head_dim, hidden] -> [hidden, heads, head_dim]
            return w.reshape(heads, 3, -1, hidden)[:, part].permute(2, 0, 1)

        def bias(b):  # [heads * 3 * head_dim] -> [heads, head_dim]
            return b.reshape(heads, 3, -1)[:, part]

        return kernel, bias

    def transpose(w):
        return w.T

    checkpoint.assign(backbone.token_embedding.embeddings, "transformer.word_embeddings.weight")
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"transformer.h.{i}"
        attention, feedforward = block.attention, block.feedforward
        qkv = f"{prefix}.self_attention.query_key_value"
        for part, name in enumerate(("query", "key", "value")):
            kernel, bias = fused(part)
            checkpoint.assign(getattr(attention, f"{name}_kernel"), f"{qkv}.weight", kernel)
            checkpoint.assign(getattr(attention, f"{name}_bias"), f"{qkv}.bias", bias)
        pairs = {
            f"{prefix}.self_attention.dense": (attention.output_kernel, attention.output_bias),
            f"{prefix}.mlp.dense_h_to_4h": (feedforward.intermediate_kernel, feedforward.intermediate_bias),
            f"{prefix}.mlp.dense_4h_to_h": (feedforward.output_kernel, feedforward.output_bias),
        }
        for name, (kernel, bias) in pairs.items():
            checkpoint.assign(kernel, f"{name}.weight", transpose)
            checkpoint.assign(bias, f"{name}.bias")
        for name, norm in (("input_layernorm", block.attention_norm), ("post_attention_layernorm", block.feedforward_norm)):
            checkpoint.assign(norm.gamma, f"{prefix}.{name}.weight")
            checkpoint.assign(norm.beta, f"{prefix}.{name}.bias")
    checkpoint.assign(backbone.layer_norm.gamma, "transformer.ln_f.weight")
    checkpoint.assign(backbone.layer_norm.beta, "transformer.ln_f.bias")
