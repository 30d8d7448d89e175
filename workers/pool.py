"""The model pool: loaded tasks stay pinned in the worker between jobs.

Loading a preset costs seconds to minutes; generating for a small job can cost
less. The pool keeps tasks keyed by (preset location, dtype) and evicts the
least recently used ones when the weights of all pinned tasks would exceed the
memory budget (`LMQ_MODEL_MEMORY_GB`). Tasks load on the device the settings name
(`LMQ_DEVICE`: a GPU when there is one, in bfloat16 unless the job names a dtype).

An adapter preset (``lmq.core.adapters``) is pinned over its base: the base once, however many
adapters of it are pinned, and each adapter as an entry of its own at its own size (its low-rank
weights), evicted on its own; evicting a base evicts its adapters with it. A job on an adapter gets
the base's task and the adapter's name (``PinnedModel.adapter``), which its rows then name.

Beside each pinned task the pool keeps its engine (``engine_for(task)``, e.g.
``workers.batching.shared_engine``): one decode engine, stepped by a thread of its own,
that every generate job on that model (and on its adapters) submits its rows to, so that
jobs running at once share each step. An evicted model's engine is closed: it finishes
what is in flight.
"""

from __future__ import annotations

import functools
import gc
import math
import pathlib
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
    adapter: str | None = None  # the adapter (loaded over ``model``) the job's rows name, if its preset is one
    engine: object | None = None  # the model's shared engine, when the pool keeps one


@dataclass
class _Entry:
    """What one pool key holds: a task, or an adapter over the task pinned at ``base``."""

    model: object
    size: int
    base: PoolKey | None = None
    engine: object | None = None  # a task's shared engine (``engine_for``); an adapter uses its base's


def adapter_base(location: str) -> str | None:
    """The base preset an adapter preset at ``location`` names, or None when it is no adapter preset
    (a model preset, or not a local directory). A config that names none is a ValueError."""
    if not pathlib.Path(location).is_dir():
        return None
    from lmq.core.adapters import is_adapter_preset, named_base
    from lmq.core.presets.files import PresetFiles

    files = PresetFiles(location)
    return named_base(files) if is_adapter_preset(files) else None


def load_adapter(model, location: str):
    """Loads the adapter preset at ``location`` over ``model`` (its base), named by its location."""
    return model.load_adapter(location, name=location)


def unload_adapter(model, location: str) -> None:
    model.adapters.remove(location)


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
        self._pinned: OrderedDict[PoolKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, location: str, dtype: str | None = None, locate: Callable[[str], str] | None = None) -> PinnedModel:
        """The task pinned for ``location``; for an adapter preset, its base's task with the adapter
        loaded over it, the base found by ``locate(handle)`` (the job's resolver; by default the
        library's, which knows no store names)."""
        base = adapter_base(location)
        with self._lock:
            if base is None:
                return self._get_model((location, dtype))
            if locate is None:
                from lmq.core.presets import PresetResolver

                locate = PresetResolver().locate
            base_key = (locate(base), dtype)
            pinned = self._get_model(base_key)
            key = (location, dtype)
            if key in self._pinned:
                self._pinned.move_to_end(key)
                self.hits += 1
                return PinnedModel(
                    pinned.model, pinned.hit, pinned.load_seconds, pinned.evicted, adapter=location, engine=pinned.engine
                )
            self.misses += 1
            started = time.perf_counter()
            adapter = load_adapter(pinned.model, location)
            load_seconds = pinned.load_seconds + time.perf_counter() - started
            evicted = pinned.evicted + self._make_room(adapter.nbytes, keep=base_key)
            self._pinned[key] = _Entry(pinned.model, adapter.nbytes, base=base_key)
            return PinnedModel(pinned.model, hit=False, load_seconds=load_seconds, evicted=evicted, adapter=location,
                               engine=pinned.engine)

    def _get_model(self, key: PoolKey) -> PinnedModel:
        if key in self._pinned:
            self._pinned.move_to_end(key)
            self.hits += 1
            entry = self._pinned[key]
            return PinnedModel(entry.model, hit=True, load_seconds=0.0, engine=entry.engine)
        self.misses += 1
        started = time.perf_counter()
        model = self._load(*key)
        load_seconds = time.perf_counter() - started
        size = self._measure(model)
        evicted = self._make_room(size)
        engine = self._engine_for(model) if self._engine_for is not None else None
        self._pinned[key] = _Entry(model, size, engine=engine)
        return PinnedModel(model, hit=False, load_seconds=load_seconds, evicted=evicted, engine=engine)

    def _make_room(self, incoming_bytes: int, keep: PoolKey | None = None) -> list[str]:
        """Evict least recently used models and adapters until the new one fits (it always loads),
        never ``keep`` (the base of an adapter coming in); a base goes with its adapters."""
        evicted = []
        while self.pinned_bytes + incoming_bytes > self.budget_bytes:
            victim = next((key for key in self._pinned if key != keep), None)
            if victim is None:
                break
            for key in [victim] + [k for k, entry in self._pinned.items() if entry.base == victim]:
                entry = self._pinned.pop(key)
                if entry.base is not None and entry.base in self._pinned:  # an adapter over a base that stays
                    unload_adapter(entry.model, key[0])
                if entry.base is None and entry.engine is not None:
                    entry.engine.close()  # its jobs in flight finish; the next ones get the new model's
                evicted.append(key[0] if key[1] is None else f"{key[0]} ({key[1]})")
        if evicted:
            _release_memory()
        return evicted

    @property
    def pinned_bytes(self) -> int:
        return sum(entry.size for entry in self._pinned.values())

    def keys(self) -> list[PoolKey]:
        """Pinned keys, least recently used first."""
        return list(self._pinned)


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
