"""The model pool: loaded tasks stay pinned in the worker between jobs.

Loading a preset costs seconds to minutes; generating for a small job can cost
less. The pool keeps tasks keyed by (preset location, dtype) and evicts the
least recently used ones when the weights of all pinned tasks would exceed the
memory budget (`LMQ_MODEL_MEMORY_GB`). Tasks load on the device the settings name
(`LMQ_DEVICE`: a GPU when there is one, in bfloat16 unless the job names a dtype).

Beside each pinned task the pool keeps its engine (``engine_for(task)``, e.g.
``workers.batching.shared_engine``): one decode engine, stepped by a thread of its own,
that every generate job on that model submits its rows to, so that jobs running at once
share each step. An evicted model's engine is closed: it finishes what is in flight.
"""

from __future__ import annotations

import functools
import gc
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

PoolKey = tuple[str, str | None]


def load_task(location: str, dtype: str | None, device: str = "auto", budget_bytes: int | None = None):
    """Build the task the preset names on ``device`` (keras/torch are imported here, not before); a
    preset whose weights, as its config declares them, exceed ``budget_bytes`` is refused unbuilt."""
    from lmq.core.models import Task
    from lmq.core.presets import PresetResolver
    from lmq.core.presets.sizes import check_preset_fits

    if budget_bytes is not None:
        budget = f"the model pool's LMQ_MODEL_MEMORY_GB ({budget_bytes / 2**30:g} GiB)"
        check_preset_fits(PresetResolver().files(location), budget_bytes, budget)
    return Task.from_preset(location, dtype=dtype, device=device)


def weight_bytes(model) -> int:
    """Bytes held by a model's weights, from shapes and dtypes (e.g. 'bfloat16' -> 2)."""
    total = 0
    for variable in model.weights:
        bits = re.search(r"(\d+)$", str(variable.dtype))
        total += math.prod(variable.shape) * (int(bits.group(1)) // 8 if bits else 1)
    return total


@dataclass
class PinnedModel:
    """A pinned model handed to one job, and what getting it cost."""

    model: object
    hit: bool
    load_seconds: float
    evicted: list[str] = field(default_factory=list)
    engine: object | None = None  # the model's shared engine, when the pool keeps one


class ModelPool:
    def __init__(
        self,
        budget_bytes: int,
        load: Callable[[str, str | None], object] | None = None,
        measure: Callable[[object], int] = weight_bytes,
        device: str = "auto",
        engine_for: Callable[[object], object | None] | None = None,
    ):
        """``load(location, dtype)`` builds a task; by default ``load_task`` on ``device``
        (``LMQ_DEVICE``'s values), refusing a preset whose weights alone exceed the budget.
        ``engine_for(task)``: the started engine kept beside a task as it loads (None: none)."""
        self.budget_bytes = budget_bytes
        self._load = load or functools.partial(load_task, device=device, budget_bytes=budget_bytes)
        self._measure = measure
        self._engine_for = engine_for
        self._pinned: OrderedDict[PoolKey, tuple[object, int]] = OrderedDict()
        self._engines: dict[PoolKey, object] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, location: str, dtype: str | None = None) -> PinnedModel:
        key = (location, dtype)
        with self._lock:
            if key in self._pinned:
                self._pinned.move_to_end(key)
                self.hits += 1
                return PinnedModel(self._pinned[key][0], hit=True, load_seconds=0.0, engine=self._engines.get(key))
            self.misses += 1
            started = time.perf_counter()
            model = self._load(location, dtype)
            load_seconds = time.perf_counter() - started
            size = self._measure(model)
            evicted = self._make_room(size)
            self._pinned[key] = (model, size)
            engine = self._engines[key] = self._engine_for(model) if self._engine_for is not None else None
            return PinnedModel(model, hit=False, load_seconds=load_seconds, evicted=evicted, engine=engine)

    def _make_room(self, incoming_bytes: int) -> list[str]:
        """Evict least recently used models until the new one fits (it always loads)."""
        evicted = []
        while self._pinned and self.pinned_bytes + incoming_bytes > self.budget_bytes:
            (location, dtype), _ = self._pinned.popitem(last=False)
            engine = self._engines.pop((location, dtype), None)
            if engine is not None:
                engine.close()  # its jobs in flight finish; the next ones get the new model's
            evicted.append(location if dtype is None else f"{location} ({dtype})")
        if evicted:
            _release_memory()
        return evicted

    @property
    def pinned_bytes(self) -> int:
        return sum(size for _, size in self._pinned.values())

    def keys(self) -> list[PoolKey]:
        """Pinned keys, least recently used first."""
        return list(self._pinned)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
