"""Phi3Backbone: KerasHub's arguments and defaults on lmq's shared decoder blocks, with longrope.

Longrope ("su") follows transformers 5, not KerasHub 0.32. Both use the long factors
once the sequence is longer than ``pretraining_sequence_length``; transformers decides
per forward pass by the batch's longest sequence (max position + 1) and, when a
generation first grows past that length, recomputes the whole KV cache with the long
factors. KerasHub decides by the length of each call's input, so its cached decoding
(one token per call) always uses the short factors.
"""

import torch

from lmq.core.layers import KVCache, RotaryEmbedding
from lmq.plugins.llama.llama_backbone import LlamaStyleBackbone

class LongRopeKVCache(KVCache):
    """A KV cache that also keeps the token ids it holds, so that a generation growing
    past the pretraining length can recompute every layer's keys with the long factors."""

    def __init__(self, *shape, prompt_width, long_context):
        super().__init__(*shape)
        _, batch_size, _, max_length = shape[:4]
        self.token_ids = torch.zeros((batch_size, max_length), dtype=torch.long, device=self.keys.device)
        self.prompt_width = prompt_width
        self.long_context = long_context

    def row_tensors(self):
        return {**super().row_tensors(), "token_ids": (0, 1)}

    def take(self, other, rows):
        super().take(other, rows)
        self.long_context |= other.long_context

    @property
    def prefix_variant(self):
        """Keys computed with the short factors are not those with the long ones: a prefix
        cache keeps the blocks of one kind."""
        return self.long_context


class Phi3Backbone(LlamaStyleBackbone):
    """Phi-3: the Llama-family decoder (RMSNorm pre-norm, grouped-query attention, SwiGLU).

    ``rope_scaling_type="su"`` (transformers' "longrope") divides the rotary frequencies by
    ``rope_scaling_short_factor`` or ``rope_scaling_long_factor`` (one per frequency) and
    scales cos/sin by sqrt(1 + log(max / pretraining length) / log(pretraining length)).
    ``sliding_window`` is not KerasHub's: transformers' Phi-3 checkpoints may set one.
    """

    keras_hub_config = (
        "vocabulary_size",
        "num_layers",
        "num_query_heads",
        "hidden_dim",
        "intermediate_dim",
        "num_key_value_heads",
        "layer_norm_epsilon",
        "dropout",
        "max_sequence_length",
        "pretraining_sequence_length",
        "rope_max_wavelength",
        "rope_scaling_type",
        "rope_scaling_short_factor",
        "rope_scaling_long_factor",
    )
    extra_config = ("sliding_window",)  # KerasHub 0.32's Phi3Backbone has no such argument
    keras_hub_layout = {
        "block": "phi3_decoder",
        "attention": "attention",
        "query": "query_dense",
        "key": "key_dense",
        "value": "value_dense",
        "output": "output_dense",
        "attention_norm": "pre_attention_layernorm",
        "feedforward_norm": "post_attention_layernorm",
        "gate": "feedforward_gate_dense",
        "intermediate": "feedforward_intermediate_dense",
        "feedforward_output": "feedforward_output_dense",
        "final_norm": "phi3_layer_norm",
    }

    def __init__(
        self,
        vocabulary_size, num_layers, hidden_dim, intermediate_dim, num_query_heads, num_key_value_heads,
        layer_norm_epsilon=1e-6, dropout=0.0, max_sequence_length=4096, pretraining_sequence_length=4096,
        rope_max_wavelength=10000, rope_scaling_type=None, rope_scaling_short_factor=None,
        rope_scaling_long_factor=None, sliding_window=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if rope_scaling_type not in (None, "su", "longrope"):
            raise ValueError(f"Phi3Backbone: unsupported rope_scaling_type {rope_scaling_type!r} (None or 'su').")
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_query_heads = num_query_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.num_key_value_heads = num_key_value_heads
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.max_sequence_length = max_sequence_length
        self.pretraining_sequence_length = pretraining_sequence_length
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_type = rope_scaling_type
        self.rope_scaling_short_factor = rope_scaling_short_factor
        self.rope_scaling_long_factor = rope_scaling_long_factor
        self.sliding_window = sliding_window
        self.head_dim = hidden_dim // num_query_heads
        scaled = rope_scaling_type is not None
        self.rotary = RotaryEmbedding(
            self.head_dim,
            max_wavelength=rope_max_wavelength,
            short_factor=rope_scaling_short_factor if scaled else None,
            long_factor=rope_scaling_long_factor if scaled else None,
            max_sequence_length=max_sequence_length,
            pretraining_sequence_length=pretraining_sequence_length,
        )
        self.build_layers()

    # -- longrope: the factors follow the sequence length, as in transformers ----------------

    def _context(self, positions, context):
        """The rotary tables with the long factors once the sequence outgrows the pretraining length."""
        if isinstance(context.cache, LongRopeKVCache):
            long_context = context.cache.long_context
        else:  # a forward pass over positions [0, length)
            long_context = positions.shape[-1] > self.pretraining_sequence_length
        dtype = self.token_embedding.output_dtype
        context.cos, context.sin = self.rotary.cos_sin(positions, dtype, long_context)
        return context

    def new_cache(self, batch_size, max_length, prompt_width=None):
        if self.rope_scaling_type is None:
            return super().new_cache(batch_size, max_length, prompt_width)
        embeddings = self.token_embedding.embeddings.value
        shape = (len(self.transformer_layers), batch_size, self.num_key_value_heads, max_length, self.head_dim)
        width = prompt_width or 0
        return LongRopeKVCache(
            *shape,
            self.token_embedding.output_dtype,
            embeddings.device,
            prompt_width=width,
            long_context=width > self.pretraining_sequence_length,
        )

    def forward_step(self, step, cache):
        if not isinstance(cache, LongRopeKVCache):
            return super().forward_step(step, cache)
        cache.token_ids[step.token_rows, step.positions] = step.token_ids
        ends = [start + length for _, start, length in step.chunks]
        longest = max(ends + [step.decode_width if step.decode_rows else 0])
        if not cache.long_context and longest > self.pretraining_sequence_length:
            # A sequence just outgrew the pretraining length: like transformers, recompute
            # every cached key with the long factors (each row's slots past its position
            # are hidden by causal masking and rewritten by its later steps).
            cache.long_context = True
            self.prefill(cache.token_ids[:, :longest].clone(), cache)
        return super().forward_step(step, cache)
