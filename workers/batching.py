"""The micro-batch scheduler: prompts of similar length run together.

A batch pads every row to its longest prompt, so sorting by length before
cutting batches wastes little compute on padding. A batch is cut when it has
`max_items` rows or when rows x (longest prompt + new tokens) would pass
`max_tokens`, which bounds its memory.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    length: int  # in tokens
    custom_id: str | None = None


def plan_micro_batches(
    prompts: list[Prompt], *, max_items: int, max_tokens: int, new_tokens: int = 0
) -> list[list[Prompt]]:
    batches: list[list[Prompt]] = []
    current: list[Prompt] = []
    for prompt in sorted(prompts, key=lambda p: (p.length, p.index)):
        padded_cost = (len(current) + 1) * (prompt.length + new_tokens)
        if current and (len(current) == max_items or padded_cost > max_tokens):
            batches.append(current)
            current = []
        current.append(prompt)
    if current:
        batches.append(current)
    return batches


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA and CPU allocators report running out differently; all mean 'use a smaller batch'."""
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
