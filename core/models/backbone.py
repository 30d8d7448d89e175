"""Backbones: the network without its task head.

``Backbone`` carries what every architecture shares (KerasHub-style config, the
weight layout of KerasHub's ``model.weights.h5``). ``DecoderOnlyBackbone`` is the
decoder stack Llama, Mistral and Phi-3 share, with the two entry points that
generation uses: ``prefill`` (the whole prompt in one pass) and ``decode`` (one
token per row, each row at its own position), both writing a ``KVCache`` (a
``RollingKVCache`` when a sliding window is shorter than the generation).
"""

import keras
import torch

from core.layers import (
    AttentionContext,
    CachedAttention,
    DecoderBlock,
    GatedFeedForward,
    KVCache,
    ReversibleEmbedding,
    RMSNorm,
    RollingKVCache,
)
from core.models.serialization import KerasHubSerializable


def dtype_name(dtype):
    """A dtype argument as KerasHub configs store it (a policy dict) -> its name."""
    if isinstance(dtype, dict):
        return dtype.get("config", {}).get("name")
    if isinstance(dtype, keras.DTypePolicy):
        return dtype.name
    return dtype


class Backbone(KerasHubSerializable, keras.Model):
    """Subclasses define ``keras_hub_weights()``: {path in KerasHub's model.weights.h5: variable}."""

    config_file = "config.json"

    def __init__(self, dtype=None, name=None, trainable=True, **kwargs):
        super().__init__(dtype=dtype_name(dtype), name=name or self.default_name(), trainable=trainable, **kwargs)

    def base_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, load_weights=True, dtype=None, resolver=None):
        from core.presets import load_backbone

        return load_backbone(preset, cls=cls, load_weights=load_weights, dtype=dtype, resolver=resolver)

    def enable_lora(self, rank, alpha=None):
        """Freezes every weight and adds trainable low-rank updates to the attention's query
        and value projections (KerasHub's ``Backbone.enable_lora``). ``save_to_preset``
        writes the updates merged into the kernels, so the preset is a plain model."""
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        attention_layers = [layer for layer in self._flatten_layers() if isinstance(layer, CachedAttention)]
        if not attention_layers:
            raise ValueError(f"{type(self).__name__} has no layer that supports LoRA.")
        for variable in self.variables:
            variable.trainable = False
        for layer in attention_layers:
            layer.enable_lora(rank, alpha)

    def weights_to_save(self):
        """{path: value} for ``model.weights.h5``, with LoRA updates merged in."""
        merged = {}
        for layer in self._flatten_layers():
            if isinstance(layer, CachedAttention):
                merged.update(layer.merged_lora_kernels())
        return {path: merged.get(id(v), v.value) for path, v in self.keras_hub_weights().items()}

    @property
    def device(self):
        return self.token_embedding.embeddings.value.device


class DecoderOnlyBackbone(Backbone):
    """Token embedding -> ``DecoderBlock`` stack -> final norm.

    Subclasses build ``token_embedding``, ``transformer_layers``, ``layer_norm``
    (``build_llama_style_layers`` builds all three) and ``rotary`` (or None), set
    ``num_key_value_heads``/``head_dim``, and may set ``sliding_window``.
    ``keras_hub_layout`` names the layers of KerasHub's weight file.
    """

    sliding_window = None
    keras_hub_layout = None  # see ``keras_hub_weights``

    def build_llama_style_layers(self, tie_word_embeddings=False):
        """The layers Llama and Mistral share: RMSNorm pre-norm, grouped-query attention, SwiGLU.

        Reads the config attributes the subclass has set: ``vocabulary_size``, ``num_layers``,
        ``num_query_heads``, ``num_key_value_heads``, ``head_dim``, ``hidden_dim``,
        ``intermediate_dim``, ``layer_norm_epsilon``, ``dropout``.
        """
        policy = self.dtype_policy
        self.token_embedding = ReversibleEmbedding(
            self.vocabulary_size,
            self.hidden_dim,
            tie_weights=tie_word_embeddings,
            dtype=policy,
            name="token_embedding",
        )
        self.transformer_layers = [
            DecoderBlock(
                attention=CachedAttention(
                    self.hidden_dim,
                    self.num_query_heads,
                    self.num_key_value_heads,
                    head_dim=self.head_dim,
                    dropout=self.dropout,
                    cache_index=i,
                    dtype=policy,
                ),
                feedforward=GatedFeedForward(self.hidden_dim, self.intermediate_dim, dtype=policy),
                attention_norm=RMSNorm(self.hidden_dim, self.layer_norm_epsilon, dtype=policy),
                feedforward_norm=RMSNorm(self.hidden_dim, self.layer_norm_epsilon, dtype=policy),
                dropout=self.dropout,
                dtype=policy,
                name=f"transformer_layer_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.layer_norm = RMSNorm(
            self.hidden_dim, self.layer_norm_epsilon, dtype=policy, name="sequence_output_layernorm"
        )

    def call(self, inputs, training=False):
        token_ids = torch.as_tensor(inputs["token_ids"], device=self.device).long()
        batch, length = token_ids.shape
        padding_mask = inputs.get("padding_mask")
        if padding_mask is None:
            padding_mask = torch.ones_like(token_ids, dtype=torch.bool)
        padding_mask = torch.as_tensor(padding_mask, device=self.device).bool()
        positions = torch.arange(length, device=self.device).expand(batch, length)
        mask = self.attention_mask(positions, positions) & padding_mask[:, None, None, :]
        # A query with no key left (left padding) would give NaNs; it attends to all, like KerasHub.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
        context = self._context(positions, mask=mask)
        return self.hidden_states(token_ids, context, training=training)

    def attention_mask(self, query_positions, key_positions):
        """Positions [batch, query] and [batch or 1, keys] -> bool [batch, 1, query, keys].

        Causal and windowed: a query at position i sees keys at j with
        i - sliding_window < j <= i, as transformers' Mistral does (and KerasHub's).
        """
        distance = query_positions[:, None, :, None] - key_positions[:, None, None, :]
        allowed = distance >= 0
        if self.sliding_window:
            allowed &= distance < self.sliding_window
        return allowed

    def _context(self, positions, long_context=False, **kwargs):
        """``long_context`` picks longrope's long factors (see ``RotaryEmbedding``)."""
        dtype = self.token_embedding.embeddings.value.dtype
        cos, sin = self.rotary.cos_sin(positions, dtype, long_context) if self.rotary else (None, None)
        return AttentionContext(cos=cos, sin=sin, **kwargs)

    def hidden_states(self, token_ids, context, training=False):
        x = self.token_embedding.call(token_ids)  # [batch, seq, hidden]
        for block in self.transformer_layers:
            x = block.call(x, context, training=training)
        return self.layer_norm.call(x)

    # -- generation -----------------------------------------------------------------

    def new_cache(self, batch_size, max_length, prompt_width=None):
        """A cache of ``max_length`` slots, or a rolling one when the window is shorter.

        ``prompt_width`` (the longest prompt) lets a rolling cache stop at window + width - 1 slots.
        """
        embeddings = self.token_embedding.embeddings.value
        shape = (len(self.transformer_layers), batch_size, self.num_key_value_heads, max_length, self.head_dim)
        if self.sliding_window and self.sliding_window < max_length:
            return RollingKVCache(
                *shape,
                embeddings.dtype,
                embeddings.device,
                window=self.sliding_window,
                prompt_width=prompt_width or max_length,
            )
        return KVCache(*shape, embeddings.dtype, embeddings.device)

    def prefill(self, token_ids, cache, rows=None):
        """Right-padded prompts [batch, seq] -> hidden states; fills cache slots [0, seq).

        ``rows`` (a tensor of cache rows) lets prompts be prefilled group by group.
        """
        batch, length = token_ids.shape
        positions = torch.arange(length, device=token_ids.device).expand(batch, length)
        if self.sliding_window and length > self.sliding_window:
            context = self._context(
                positions, mask=self.attention_mask(positions, positions), cache=cache, cache_rows=rows
            )
        else:  # padding sits after every real token, so causal masking is enough
            context = self._context(positions, is_causal=True, cache=cache, cache_rows=rows)
        return self.hidden_states(token_ids, context)

    def decode(self, token_ids, positions, cache, key_length):
        """One token per row [batch, 1] at ``positions`` [batch] -> hidden [batch, 1, hidden].

        ``key_length`` (a Python int, ``positions.max() + 1``) bounds the cache slots read.
        """
        slots, key_length, key_positions = cache.step(positions, key_length)
        query_positions = positions[:, None]
        context = self._context(
            query_positions,
            mask=self.attention_mask(query_positions, key_positions),
            cache=cache,
            write_positions=slots,
            key_length=key_length,
        )
        return self.hidden_states(token_ids, context)

    # -- KerasHub weight layout -------------------------------------------------------

    def keras_hub_weights(self):
        layout = self.keras_hub_layout
        weights = {"layers/reversible_embedding/vars/0": self.token_embedding.embeddings}
        if self.token_embedding.reverse_embeddings is not None:
            weights["layers/reversible_embedding/vars/1"] = self.token_embedding.reverse_embeddings
        for index, block in enumerate(self.transformer_layers):
            prefix = f"layers/{layout['block']}" + (f"_{index}" if index else "")
            attention = f"{prefix}/{layout['attention']}"
            parts = {
                f"{attention}/{layout['query']}": block.attention.query_kernel,
                f"{attention}/{layout['key']}": block.attention.key_kernel,
                f"{attention}/{layout['value']}": block.attention.value_kernel,
                f"{attention}/{layout['output']}": block.attention.output_kernel,
                f"{prefix}/{layout['attention_norm']}": block.attention_norm.scale,
                f"{prefix}/{layout['feedforward_norm']}": block.feedforward_norm.scale,
                f"{prefix}/{layout['gate']}": block.feedforward.gate_kernel,
                f"{prefix}/{layout['intermediate']}": block.feedforward.intermediate_kernel,
                f"{prefix}/{layout['feedforward_output']}": block.feedforward.output_kernel,
            }
            weights.update({f"{path}/vars/0": variable for path, variable in parts.items()})
        weights[f"layers/{layout['final_norm']}/vars/0"] = self.layer_norm.scale
        return weights


# KerasHub's attribute names inside its Llama-style decoder layer (Llama, Mistral).
LLAMA_STYLE_LAYOUT = {
    "attention": "_self_attention_layer",
    "query": "_query_dense",
    "key": "_key_dense",
    "value": "_value_dense",
    "output": "_output_dense",
    "attention_norm": "_self_attention_layernorm",
    "feedforward_norm": "_feedforward_layernorm",
    "gate": "_feedforward_gate_dense",
    "intermediate": "_feedforward_intermediate_dense",
    "feedforward_output": "_feedforward_output_dense",
}
