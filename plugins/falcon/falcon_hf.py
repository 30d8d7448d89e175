"""Converts transformers' ``FalconForCausalLM`` checkpoints, of three layouts:

- ALiBi (falcon-rw-1b): KerasHub's one Falcon layout, ``FalconBackbone``;
- rotary, multi-query, attention in parallel with the MLP after one norm (Falcon-7B),
- rotary, ``new_decoder_architecture`` with ``num_kv_heads`` groups and a norm each
  for attention and MLP (Falcon-40B/180B): both ``FalconRotaryBackbone``.
"""

import json

from lmq.core.presets.transformers_import import rope_settings

# setting: (what the ALiBi layout needs, transformers' default when config.json omits it)
ALIBI_SETTINGS = {
    "new_decoder_architecture": (False, False),
    "multi_query": (False, True),
    "parallel_attn": (False, True),
    "bias": (True, False),
    "tie_word_embeddings": (True, True),
}


def backbone_class(hf_config):
    """The backbone class name for this checkpoint's layout."""
    return "FalconBackbone" if hf_config.get("alibi", False) else "FalconRotaryBackbone"


def backbone_config(hf_config):
    if hf_config.get("activation", "gelu") != "gelu":
        raise ValueError(f"config.json: activation={json.dumps(hf_config['activation'])} is unsupported; Falcon needs gelu.")
    hidden = hf_config["hidden_size"]
    common = {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["num_hidden_layers"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "hidden_dim": hidden,
        "intermediate_dim": hf_config.get("ffn_hidden_size") or 4 * hidden,
        "layer_norm_epsilon": hf_config.get("layer_norm_epsilon", 1e-5),
        "attention_dropout_rate": hf_config.get("attention_dropout", 0.0),
        "feedforward_dropout_rate": hf_config.get("hidden_dropout", 0.0),
    }
    if backbone_class(hf_config) == "FalconBackbone":
        for key, (required, default) in ALIBI_SETTINGS.items():
            if hf_config.get(key, default) != required:
                raise ValueError(
                    f"config.json: {key}={json.dumps(hf_config.get(key, default))} with alibi=true is unsupported; "
                    f"FalconBackbone (the falcon-rw-1b layout) needs {key}={json.dumps(required)}."
                )
        return common
    theta, rope_type, _ = rope_settings(hf_config)
    if rope_type != "default":
        raise ValueError(f"config.json: rope scaling {rope_type!r} is unsupported for Falcon.")
    new_architecture = hf_config.get("new_decoder_architecture", False)
    parallel = new_architecture or hf_config.get("parallel_attn", True)
    return {
        **common,
        "num_kv_heads": kv_heads(hf_config),
        "num_layer_norms": (hf_config.get("num_ln_in_parallel_attn") or 2) if new_architecture else (1 if parallel else 2),
        "parallel_attention": parallel,
        "use_bias": hf_config.get("bias", False),
        "tie_word_embeddings": hf_config.get("tie_word_embeddings", True),
        "rope_max_wavelength": theta,
    }


def kv_heads(hf_config):
    """Key/value heads as transformers counts them: ``num_kv_heads`` groups in the new
    architecture, else 1 with ``multi_query`` and one per query head without."""
    if hf_config.get("new_decoder_architecture", False):
        return hf_config.get("num_kv_heads") or hf_config["num_attention_heads"]
    return 1 if hf_config.get("multi_query", True) else hf_config["num_attention_heads"]


def convert_weights(backbone, checkpoint):
    """Splits each layer's fused ``query_key_value``: per key/value group, its query heads,
    then its key, then its value ([groups * (queries + 2) * head_dim, hidden]); multi-head
    attention is one query per group, multi-query one group."""
    hidden = backbone.hidden_dim
    groups = backbone.num_key_value_heads
    queries = backbone.num_attention_heads // groups
    parts = {"query": slice(0, queries), "key": slice(queries, queries + 1), "value": slice(queries + 1, queries + 2)}

    def fused(part):
        def kernel(w):  # -> [hidden, heads, head_dim]
            return w.reshape(groups, queries + 2, -1, hidden)[:, parts[part]].flatten(0, 1).permute(2, 0, 1)

        def bias(b):  # -> [heads, head_dim]
            return b.reshape(groups, queries + 2, -1)[:, parts[part]].flatten(0, 1)

        return kernel, bias

    def transpose(w):
        return w.T

    checkpoint.assign(backbone.token_embedding.embeddings, "transformer.word_embeddings.weight")
    for i, block in enumerate(backbone.transformer_layers):
        prefix = f"transformer.h.{i}"
        attention, feedforward = block.attention, block.feedforward
        qkv = f"{prefix}.self_attention.query_key_value"
        for part in parts:
            kernel, bias = fused(part)
            checkpoint.assign(getattr(attention, f"{part}_kernel"), f"{qkv}.weight", kernel)
            if getattr(attention, f"{part}_bias") is not None:
                checkpoint.assign(getattr(attention, f"{part}_bias"), f"{qkv}.bias", bias)
        dense = {
            f"{prefix}.self_attention.dense": (attention.output_kernel, attention.output_bias),
            f"{prefix}.mlp.dense_h_to_4h": (feedforward.intermediate_kernel, feedforward.intermediate_bias),
            f"{prefix}.mlp.dense_4h_to_h": (feedforward.output_kernel, feedforward.output_bias),
        }
        for name, (kernel, bias) in dense.items():
            checkpoint.assign(kernel, f"{name}.weight", transpose)
            if bias is not None:
                checkpoint.assign(bias, f"{name}.bias")
        for name, norm in zip(norm_names(backbone), (block.attention_norm, block.feedforward_norm)):
            if norm is not None:
                checkpoint.assign(norm.gamma, f"{prefix}.{name}.weight")
                checkpoint.assign(norm.beta, f"{prefix}.{name}.bias")
    checkpoint.assign(backbone.layer_norm.gamma, "transformer.ln_f.weight")
    checkpoint.assign(backbone.layer_norm.beta, "transformer.ln_f.bias")
    if backbone.token_embedding.reverse_embeddings is not None:
        checkpoint.assign(backbone.token_embedding.reverse_embeddings, "lm_head.weight", transpose)


def norm_names(backbone):
    """transformers' names for a block's (attention, MLP) norms."""
    if getattr(backbone, "parallel_attention", False) and backbone.num_layer_norms == 2:
        return "ln_attn", "ln_mlp"
    return "input_layernorm", "post_attention_layernorm"
