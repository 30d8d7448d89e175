"""Multi-head attention with grouped key/value heads, over a KV cache (``lmq.core.layers.cache``).

One ``AttentionContext`` is built per forward pass (by the backbone) and shared
by every layer: rotary tables, the mask, and where the cache is written;
attention itself is ``torch.nn.functional.scaled_dot_product_attention``.

A generation step is one flattened sequence of tokens from many requests (decoding
rows, prompt chunks): the projections run on all of it at once, and attention runs
per ``AttentionPart`` - the decoding rows together, each chunk over its own cache row -
since torch has no variable-length attention kernel on every device. Decoding rows, one
query each, take their own path (``_attend_decoding``): lmq's C++ kernel on a CPU, which
reads each row's keys to its own length, else two batched matrix products.
"""

from dataclasses import dataclass

import keras
import torch

from lmq.core import kernels
from lmq.core.layers.cache import KVCache
from lmq.core.layers.projection import Projections, cpu_float32_inference, times_transposed
from lmq.core.layers.rotary import apply_rotary


@dataclass
class AttentionContext:
    """What all attention layers of one forward pass share."""

    cos: torch.Tensor | None = None  # [batch, 1, seq, head_dim]
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [batch, 1, seq, keys]: bool (True = attend) or additive
    is_causal: bool = False  # let SDPA build the causal mask (mask must be None)
    cache: KVCache | None = None
    cache_rows: torch.Tensor | None = None  # prefill: the cache rows these prompts fill (default: all)
    write_positions: torch.Tensor | None = None  # [batch]: the cache slot of a one-token decode step
    key_length: int | None = None  # cache slots a decode step attends to
    # A flattened step (batch 1, its tokens as the sequence): the parts that attend apart,
    # and the cache row of each token.
    parts: list | None = None
    token_rows: torch.Tensor | None = None  # [tokens]; write_positions [tokens] are their slots in those rows
    pool: dict | None = None  # a prefix cache's pool ({"keys", "values": [layers, kv heads, positions, dim]}), parts read


@dataclass
class AttentionPart:
    """Queries of a flattened step that attend together: ``tokens`` of the step, ``queries``
    consecutive ones for each of ``rows`` cache rows from ``first_row``, over each row's
    first ``key_length`` cache slots."""

    tokens: slice
    first_row: int
    rows: int
    key_length: int
    mask: torch.Tensor | None  # [rows, 1 or heads, queries, key_length], bool or additive; None: causal
    shared: int = 0  # decoding rows whose first ``shared`` slots hold the same tokens: read those once
    lengths: torch.Tensor | None = None  # [rows]: decoding rows that see exactly their first slots, how many
    pooled: int | None = None  # where the ``shared`` keys start in the context's pool; None: in the first row


def decode_kernel(tensor):
    """lmq's decode attention kernel (``lmq.core.kernels``) where it takes decoding rows whose queries
    and cache are ``tensor``'s kind (float32 on a CPU, without autograd, the kernels built), else
    None. It reads each row to its own length, so rows of any lengths go through it in one call."""
    return kernels.decode_attention() if cpu_float32_inference(tensor) else None


class CachedAttention(Projections):
    """Attention with ``num_query_heads`` queries sharing ``num_key_value_heads`` keys/values.

    Kernels keep KerasHub's shapes: query [hidden, heads, head_dim], output
    [heads, head_dim, hidden] (or [heads * head_dim, hidden] with
    ``flat_output_kernel``, where KerasHub uses a plain Dense, as in Falcon).
    """

    kernels = {"query_kernel": 2, "key_kernel": 2, "value_kernel": 2, "output_kernel": 1}  # output axes
    QUERY_KEY_VALUE = ("query_kernel", "key_kernel", "value_kernel")  # projected together

    def __init__(
        self,
        hidden_dim,
        num_query_heads,
        num_key_value_heads,
        head_dim=None,
        use_bias=False,
        dropout=0.0,
        cache_index=0,
        flat_output_kernel=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_query_heads % num_key_value_heads:
            raise ValueError(
                f"num_query_heads ({num_query_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})."
            )
        self.num_query_heads = num_query_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_dim // num_query_heads
        self.dropout = dropout
        self.cache_index = cache_index
        init = keras.initializers.RandomNormal(stddev=0.02)
        d = self.head_dim

        def kernel(name, shape):
            return self.add_weight(shape=shape, initializer=init, name=name)

        def bias(name, shape):
            return self.add_weight(shape=shape, initializer="zeros", name=name) if use_bias else None

        self.query_kernel = kernel("query_kernel", (hidden_dim, num_query_heads, d))
        self.query_bias = bias("query_bias", (num_query_heads, d))
        self.key_kernel = kernel("key_kernel", (hidden_dim, num_key_value_heads, d))
        self.key_bias = bias("key_bias", (num_key_value_heads, d))
        self.value_kernel = kernel("value_kernel", (hidden_dim, num_key_value_heads, d))
        self.value_bias = bias("value_bias", (num_key_value_heads, d))
        output_shape = (num_query_heads * d, hidden_dim) if flat_output_kernel else (num_query_heads, d, hidden_dim)
        self.output_kernel = kernel("output_kernel", output_shape)
        self.output_bias = bias("output_bias", (hidden_dim,))
        self.built = True

    def _heads(self, x, name):
        """[batch, seq, hidden] -> [batch, heads, seq, head_dim] through ``{name}_kernel`` (and its LoRA)."""
        return self._split_heads(self.projected(x, f"{name}_kernel", self._bias(name)), name)

    def _query_key_value(self, x):
        """[batch, seq, hidden] -> queries, keys and values [batch, heads, seq, head_dim], in one
        GEMM where oneDNN serves them (``projected_together``)."""
        names = ("query", "key", "value")
        outputs = self.projected_together(x, self.QUERY_KEY_VALUE, [self._bias(name) for name in names])
        return [self._split_heads(y, name) for y, name in zip(outputs, names)]

    def _bias(self, name):
        bias = getattr(self, f"{name}_bias")
        return None if bias is None else bias.value.reshape(-1)

    def _split_heads(self, y, name):
        """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
        return y.unflatten(-1, getattr(self, f"{name}_kernel").shape[1:]).transpose(1, 2)

    def enable_lora(self, rank, alpha=None, names=("query_kernel", "value_kernel")):
        """Trainable low-rank updates of the query and value projections, as KerasHub's
        ``enable_lora`` adds them (``Projections.enable_lora``)."""
        super().enable_lora(rank, alpha, names)

    def call(self, x, context, training=False):
        query, key, value = self._query_key_value(x)
        if context.cos is not None:
            query, key = apply_rotary(query, key, context.cos, context.sin)
        if context.parts is not None:
            return self._attend_parts(query, key, value, context)
        if context.cache is not None:
            key, value = context.cache.update(self.cache_index, key, value, context)
        return self.attend(query, key, value, context.mask, context.is_causal, training)

    def _attend_parts(self, query, key, value, context):
        """A flattened step: queries/keys/values [1, heads, tokens, head_dim] -> [1, tokens, hidden]."""
        keys, values = context.cache.write(self.cache_index, key[0], value[0], context)  # [slots, heads, length, dim]
        outputs = []
        for part in context.parts:
            rows = slice(part.first_row, part.first_row + part.rows)
            queries = query[0, :, part.tokens].unflatten(1, (part.rows, -1)).transpose(0, 1)  # [rows, heads, q, dim]
            if part.shared:
                out = self._attend_shared_prefix(queries, keys, values, part, context.pool)
            elif queries.shape[2] == 1 and part.mask is not None:
                own_keys, own_values = keys[rows, :, : part.key_length], values[rows, :, : part.key_length]
                out = self._attend_decoding(queries, own_keys, own_values, part)
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    queries,
                    keys[rows, :, : part.key_length],
                    values[rows, :, : part.key_length],
                    attn_mask=part.mask,
                    is_causal=part.mask is None,
                    enable_gqa=self.num_query_heads != self.num_key_value_heads,
                )  # [rows, heads, queries, dim]
            outputs.append(out.transpose(1, 2).flatten(0, 1))  # [rows * queries, heads, dim]: a view for one query a row
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # [tokens, heads, dim]
        return self._output(out.flatten(1)[None])  # [1, tokens, heads * dim]

    def _attend_decoding(self, queries, keys, values, part):
        """Decoding rows, one query each: queries [rows, heads, 1, dim] over their rows' keys and
        values [rows, kv heads, keys, dim] -> [rows, heads, 1, dim]."""
        rows, heads, _, dim = queries.shape
        grouped = queries.reshape(rows, self.num_key_value_heads, heads // self.num_key_value_heads, dim) * dim**-0.5
        out, _ = self._grouped_decode_attention(grouped, keys, values, part.mask, part.lengths)
        return out.reshape(rows, heads, 1, dim)

    @staticmethod
    def _grouped_decode_attention(grouped, keys, values, mask, lengths):
        """Scaled queries [rows, kv heads, group, dim] over keys and values [rows, kv heads, keys, dim]
        -> outputs [rows, kv heads, group, dim] and the log of each softmax's denominator
        [rows, kv heads, group] (what merges them with attention over other keys).

        Where each row sees exactly its first slots (``lengths`` [rows]), on a CPU, lmq's C++
        kernel reads each row's keys once for its query heads and no further than its own length
        (``lmq.core.kernels``). Else two batched matrix products, each query head group against
        its KV head's keys, under ``mask``: SDPA's CPU kernel works in blocks of queries and
        takes about 1.5x as long for one query a row.
        """
        kernel = decode_kernel(grouped) if lengths is not None else None
        if kernel is not None:
            return kernel(grouped.contiguous(), keys, values, lengths)
        scores = torch.matmul(grouped, keys.transpose(-1, -2))  # [rows, kv, group, keys]
        if mask.dtype == torch.bool:  # [rows, 1, 1, keys]
            scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        else:  # additive, [rows, 1 or heads, 1, keys] (a bias by key position)
            scores = scores + (mask if mask.shape[1] == 1 else mask.reshape(scores.shape))
        log_sums = torch.logsumexp(scores, dim=-1)
        return torch.matmul(torch.exp(scores - log_sums[..., None]), values), log_sums

    @staticmethod
    def _attend_unmasked(queries, keys, values):
        """Scaled queries [kv heads, queries, dim] over every one of keys and values [kv heads, keys, dim]
        -> outputs [kv heads, queries, dim] and the log of each softmax's denominator [kv heads, queries].

        On a CPU without autograd this is torch's flash attention, which gives the denominators too:
        0.45 ms against 0.69 for the products below on a shared prefix's (256 queries, 400 keys of 64,
        2 KV heads). Else one product per KV head for the scores (oneDNN's, ``times_transposed``,
        reads the cache's keys as they lie), a softmax and one for the outputs.
        """
        if cpu_float32_inference(queries):
            out, log_sums = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries[None], keys[None], values[None], 0.0, False, attn_mask=None, scale=1.0
            )
            return out[0], log_sums[0]
        scores = torch.stack([times_transposed(queries[h], keys[h]) for h in range(len(keys))])
        most = scores.amax(dim=-1, keepdim=True)  # scores: [kv, queries, keys]
        weights = scores.sub_(most).exp_()
        total = weights.sum(dim=-1, keepdim=True)
        out = torch.stack([times_transposed(weights[h], values[h].t()) for h in range(len(keys))]).div_(total)
        return out, (most + total.log())[..., 0]

    def _attend_shared_prefix(self, queries, keys, values, part, pool=None):
        """Decoding rows whose first ``part.shared`` positions hold the same tokens (a shared
        system prompt or instruction): queries [rows, heads, 1, dim] -> [rows, heads, 1, dim].

        The shared keys are read once, from the part's first row, or from the prefix cache's
        ``pool`` where the rows' slots hold none (``part.pooled``): every row's queries attend to
        them together, per KV head (``_attend_unmasked``). Each row's own keys after them go
        through the decode path, and the two softmaxes merge by their denominators. Read once
        per row instead, the shared keys are the most of a decode step's memory traffic when a
        long prefix is shared. The shared copies hold the same tokens at the same positions, so
        they differ at most by float rounding.
        """
        rows, heads, _, dim = queries.shape
        kv, first, shared = self.num_key_value_heads, part.first_row, part.shared
        if part.pooled is None:
            shared_keys, shared_values = keys[first, :, :shared], values[first, :, :shared]
        else:
            window = slice(part.pooled, part.pooled + shared)
            shared_keys, shared_values = pool["keys"][self.cache_index, :, window], pool["values"][self.cache_index, :, window]
        grouped = queries.reshape(rows, kv, heads // kv, dim) * dim**-0.5
        every_query = grouped.transpose(0, 1).reshape(kv, -1, dim)  # [kv, rows x group, dim]
        shared_out, shared_log_sums = self._attend_unmasked(every_query, shared_keys, shared_values)
        shared_log_sums = shared_log_sums.reshape(kv, rows, -1).transpose(0, 1)  # [rows, kv, group]
        own = slice(first, first + rows)
        own_out, own_log_sums = self._grouped_decode_attention(
            grouped,
            keys[own, :, shared : part.key_length],
            values[own, :, shared : part.key_length],
            part.mask[..., shared:],
            None if part.lengths is None else part.lengths - shared,
        )
        # softmax over both = each part's output weighted by its share of the denominator
        shared_share = torch.sigmoid(shared_log_sums - own_log_sums)[..., None]
        shared_out = shared_out.reshape(kv, rows, -1, dim).transpose(0, 1)  # [rows, kv, group, dim]
        return torch.lerp(own_out, shared_out, shared_share).reshape(rows, heads, 1, dim)

    def attend(self, query, key, value, mask=None, is_causal=False, training=False):
        """Queries [batch, heads, seq, head_dim] over keys/values -> [batch, seq, hidden],
        through the output projection (cross-attention calls it with an encoder's keys)."""
        batch, _, seq, _ = query.shape
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if training else 0.0,
            enable_gqa=self.num_query_heads != self.num_key_value_heads,
        )  # [batch, heads, seq, head_dim]
        return self._output(out.transpose(1, 2).reshape(batch, seq, -1))

    def _output(self, out):
        """[batch, seq, heads * head_dim] -> [batch, seq, hidden] through the output projection."""
        return self.projected(out, "output_kernel", None if self.output_bias is None else self.output_bias.value)

