"""ALiBi: attention biased by key position instead of position embeddings (Falcon-RW).

Each head ``h`` adds ``slope[h] * distance`` to its attention scores. Softmax
ignores anything constant along a query's row, so ``slope[h] * key_position``
gives the same probabilities as the distance to the query; that form depends on
keys only, which suits a KV cache, and goes into SDPA as an additive float mask.
"""

import math

import torch


def alibi_slopes(num_heads):
    """[num_heads] float32: the geometric slopes of the ALiBi paper, as transformers computes them.

    A head count that is not a power of two takes the closest power's slopes and
    every other slope of the next power's.
    """
    closest = 2 ** math.floor(math.log2(num_heads))

    def geometric(n, powers):
        base = torch.tensor(2 ** (-(2 ** -(math.log2(n) - 3))), dtype=torch.float32)
        return torch.pow(base, powers)

    slopes = geometric(closest, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra = torch.arange(1, 1 + 2 * (num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, geometric(2 * closest, extra)])
    return slopes


def alibi_mask(slopes, key_positions, allowed, head_dim, dtype):
    """An additive mask [batch, heads, queries, keys]: the scaled bias where ``allowed``, -inf elsewhere.

    ``slopes``: [heads] on the positions' device; ``key_positions``: [batch or 1, keys];
    ``allowed``: bool [batch or 1, 1, queries, keys]. The bias is computed in bfloat16,
    as transformers (and the original Falcon code) does, then scaled by 1/sqrt(head_dim)
    like the scores. KerasHub keeps it in the compute dtype, which differs where a
    slope or a product is not exact in bfloat16 (many heads, long sequences).
    """
    slopes = slopes.bfloat16()
    bias = (slopes[None, :, None, None] * key_positions[:, None, None, :]).to(dtype) / math.sqrt(head_dim)
    return torch.where(allowed, bias, torch.tensor(float("-inf"), dtype=dtype, device=bias.device))
