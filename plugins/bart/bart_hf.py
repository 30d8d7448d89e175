"""Converts transformers' ``BartForConditionalGeneration`` checkpoints to ``BartBackbone``.

KerasHub's Bart has one size for both sides, GELU, post-norm blocks, no embedding scale,
and its head is the shared embedding; a checkpoint that differs is refused by name.
Positions: transformers' learned table keeps two extra rows in front (offset 2), dropped here.
Decoding starts from KerasHub's decoder start tokens ``</s> <s>``: transformers' Bart starts
from ``decoder_start_token_id`` (``</s>``) and forces ``forced_bos_token_id`` (``<s>``) next,
the same two tokens; a checkpoint that starts otherwise is refused by name.
"""

import json

POSITION_OFFSET = 2

# setting: (what BartBackbone needs, transformers' default when config.json omits it)
REQUIRED = {
    "activation_function": ("gelu", "gelu"),
    "scale_embedding": (False, False),
    "normalize_before": (False, False),
    "add_final_layer_norm": (False, False),
    "tie_word_embeddings": (True, True),
}
SAME_ON_BOTH_SIDES = (("encoder_layers", "decoder_layers"), ("encoder_attention_heads", "decoder_attention_heads"),
                      ("encoder_ffn_dim", "decoder_ffn_dim"))


def backbone_config(hf_config):
    for key, (required, default) in REQUIRED.items():
        if hf_config.get(key, default) != required:
            raise ValueError(
                f"config.json: {key}={json.dumps(hf_config.get(key, default))} is unsupported; "
                f"BartBackbone needs {key}={json.dumps(required)}."
            )
    start_tokens = {  # setting: the token it must be (transformers' default when omitted)
        "decoder_start_token_id": ("eos_token_id", hf_config.get("eos_token_id", 2)),
        "forced_bos_token_id": ("bos_token_id", hf_config.get("bos_token_id", 0)),
    }
    for key, (token, token_id) in start_tokens.items():
        if hf_config.get(key) not in (None, token_id):
            raise ValueError(
                f"config.json: {key}={json.dumps(hf_config[key])} is unsupported; BartSeq2SeqLM's decoder "
                f"starts from </s> <s>, so {key} must be {token} ({token_id})."
            )
    for encoder_key, decoder_key in SAME_ON_BOTH_SIDES:
        if hf_config[encoder_key] != hf_config[decoder_key]:
            raise ValueError(
                f"config.json: {encoder_key}={hf_config[encoder_key]} != {decoder_key}={hf_config[decoder_key]} "
                "is unsupported; BartBackbone has one size for both sides."
            )
    return {
        "vocabulary_size": hf_config["vocab_size"],
        "num_layers": hf_config["encoder_layers"],
        "num_heads": hf_config["encoder_attention_heads"],
        "hidden_dim": hf_config["d_model"],
        "intermediate_dim": hf_config["encoder_ffn_dim"],
        "dropout": hf_config.get("dropout", 0.1),
        "max_sequence_length": hf_config["max_position_embeddings"],
    }


def convert_weights(backbone, checkpoint):
    hidden = backbone.hidden_dim

    def heads(w):  # [heads * head_dim, hidden] -> [hidden, heads, head_dim]
        return w.T.reshape(hidden, backbone.num_heads, -1)

    def head_bias(b):
        return b.reshape(backbone.num_heads, -1)

    def transpose(w):
        return w.T

    def attention(layer, name):
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            checkpoint.assign(getattr(layer, f"{ours}_kernel"), f"{name}.{theirs}.weight", heads)
            checkpoint.assign(getattr(layer, f"{ours}_bias"), f"{name}.{theirs}.bias", head_bias)
        checkpoint.assign(layer.output_kernel, f"{name}.out_proj.weight", lambda w: w.T.reshape(backbone.num_heads, -1, hidden))
        checkpoint.assign(layer.output_bias, f"{name}.out_proj.bias")

    def norm(layer, name):
        checkpoint.assign(layer.gamma, f"{name}.weight")
        checkpoint.assign(layer.beta, f"{name}.bias")

    def block(layer, prefix):
        attention(layer.attention, f"{prefix}.self_attn")
        norm(layer.attention_norm, f"{prefix}.self_attn_layer_norm")
        checkpoint.assign(layer.feedforward.intermediate_kernel, f"{prefix}.fc1.weight", transpose)
        checkpoint.assign(layer.feedforward.intermediate_bias, f"{prefix}.fc1.bias")
        checkpoint.assign(layer.feedforward.output_kernel, f"{prefix}.fc2.weight", transpose)
        checkpoint.assign(layer.feedforward.output_bias, f"{prefix}.fc2.bias")
        norm(layer.feedforward_norm, f"{prefix}.final_layer_norm")

    shared = next(
        (n for n in ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight") if n in checkpoint),
        "model.shared.weight",
    )
    checkpoint.assign(backbone.token_embedding.embeddings, shared)
    if "final_logits_bias" in checkpoint and checkpoint.read("final_logits_bias").abs().max() > 0:
        raise ValueError(
            f"Preset {checkpoint.preset.name!r}: final_logits_bias is not zero; BartBackbone's head has no bias."
        )
    for side in ("encoder", "decoder"):
        position = getattr(backbone, f"{side}_position_embedding")
        checkpoint.assign(position.embeddings, f"model.{side}.embed_positions.weight", lambda w: w[POSITION_OFFSET:])
        norm(getattr(backbone, f"{side}_embeddings_layer_norm"), f"model.{side}.layernorm_embedding")
    for i, layer in enumerate(backbone.encoder_transformer_layers):
        block(layer, f"model.encoder.layers.{i}")
    for i, layer in enumerate(backbone.decoder_transformer_layers):
        prefix = f"model.decoder.layers.{i}"
        block(layer, prefix)
        attention(layer.cross_attention, f"{prefix}.encoder_attn")
        norm(layer.cross_attention_norm, f"{prefix}.encoder_attn_layer_norm")
