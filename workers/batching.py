"""How a job's prompts are batched: the row budget of continuous batching, and the
shared engine of a pinned model.

The runner streams a job's prompts through the decode engine, which keeps up to
``RowBudget.rows`` requests and ``RowBudget.cache_tokens`` KV-cache positions in
flight and refills rows as they finish. A causal LM's token-sampled rows go through the
one engine the model pool keeps for the model (``shared_engine``), whose budget is the
settings' and which every job on that model shares.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str | list[int]  # a prompt, or a chat's token ids (core.chat.chat_token_ids)
    length: int  # in tokens
    custom_id: str | None = None
    max_new_tokens: int | None = None  # the row's own, else the job's
    seed: int | None = None
    sampler: str | None = None  # the row's own, as JSON without its seed (workers/inputs.py)
    choice: int = 0  # which of its item's `choices` this row makes (n > 1: one row per choice)
    choices: int = 1
    processing: dict | None = None  # penalties, logit_bias, min_p, logprobs, response_format (workers/inputs.PROCESSING)
    stop: tuple[str, ...] | None = None  # the row's stop strings
    stop_token_ids: str | tuple[int, ...] = "auto"  # "auto" (the tokenizer's end tokens), or the ids
    adapter: str | None = None  # the adapter the row runs with, as the model's AdapterBank names it


@dataclass
class RowBudget:
    """What the decode engine may hold at once: requests, and KV-cache positions (rows x positions)."""

    rows: int
    cache_tokens: int

    def shrink(self) -> None:
        """After running out of memory: half the rows and half the cache."""
        self.rows = max(1, self.rows // 2)
        self.cache_tokens = max(1, self.cache_tokens // 2)


def cache_positions(backbone, configured: int, share: float = 0.8) -> int:
    """The budget's KV-cache positions: ``configured``, or on a GPU as many as ``share`` of
    its free memory holds (keys and values of every layer, per position) when that is more."""
    if backbone.device.type != "cuda":
        return configured
    import torch  # here, not at the top: planning a local job's batches must not load torch

    free, _ = torch.cuda.mem_get_info(backbone.device)
    dtype = backbone.token_embedding.embeddings.value.dtype
    # A decoder-only backbone's layers, or an encoder-decoder's decoder layers (its self-attention cache).
    layers = getattr(backbone, "transformer_layers", None) or backbone.decoder_transformer_layers
    heads = getattr(backbone, "num_key_value_heads", None) or backbone.num_heads
    per_position = 2 * len(layers) * heads * backbone.head_dim
    return max(configured, int(free * share) // (per_position * dtype.itemsize))


GPU_ROW_POSITIONS = 1024  # a GPU's default row budget: rows of this many positions fill its token budget
MAX_GPU_ROWS = 256


def row_budget(backbone, rows: int | None, configured_rows: int, configured_tokens: int) -> RowBudget:
    """A job's budget: its own row count (``rows``, its ``micro_batch_size``) or the configured
    one, and the positions ``cache_positions`` gives. On a GPU a job that names no row count
    gets as many rows as the token budget holds at ``GPU_ROW_POSITIONS`` each (at least the
    configured, at most ``MAX_GPU_ROWS``): the token budget then bounds the rows in flight."""
    tokens = cache_positions(backbone, configured_tokens)
    if rows is None and backbone.device.type == "cuda":
        rows = max(configured_rows, min(MAX_GPU_ROWS, tokens // GPU_ROW_POSITIONS))
    return RowBudget(rows=rows or configured_rows, cache_tokens=tokens)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA and CPU allocators report running out differently; all mean 'use a smaller batch'."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def shared_engine(task, settings):
    """The long-lived engine every generate job on ``task`` shares, sized by the settings
    (``row_budget`` with no job's own rows, LMQ_MAX_LENGTH positions a request at most) and
    stepped by a thread of its own; None for a sequence-to-sequence task, whose model keeps its
    requests' encoder inputs per call (its jobs run an engine each)."""
    from lmq.core.names import TaskKind

    if getattr(task, "task_kind", None) != TaskKind.causal_lm:
        return None
    from lmq.core.generation import DecoderOnlyModel, Engine

    budget = row_budget(task.backbone, None, settings.micro_batch_size, settings.micro_batch_tokens)
    return Engine(
        DecoderOnlyModel(task.backbone, task.adapters),  # the adapters loaded over it later too
        settings.limits.max_length,
        budget.rows,
        max_cache_tokens=budget.cache_tokens,
        tenant_rows=max(1, int(budget.rows * settings.tenant_row_share)),
        prefix_cache=settings.prefix_cache,
    ).start()
