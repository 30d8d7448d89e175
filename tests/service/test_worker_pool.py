"""The model pool on stand-in models (no keras needed), and out-of-memory errors recognised."""

from types import SimpleNamespace

import pytest

from lmq.workers.batching import is_out_of_memory
from lmq.workers.pool import ModelPool, weight_bytes


class Loads:
    """A loader that records what it loaded."""

    def __init__(self):
        self.calls = []

    def __call__(self, location, dtype):
        self.calls.append((location, dtype))
        return SimpleNamespace(location=location, dtype=dtype)


def test_second_get_is_a_hit_and_loads_nothing():
    loads = Loads()
    pool = ModelPool(budget_bytes=100, load=loads, measure=lambda model: 10)
    first = pool.get("a")
    second = pool.get("a")
    assert not first.hit and second.hit and second.load_seconds == 0.0
    assert second.model is first.model
    assert loads.calls == [("a", None)]
    assert (pool.hits, pool.misses) == (1, 1)


def test_dtype_is_part_of_the_key():
    loads = Loads()
    pool = ModelPool(budget_bytes=100, load=loads, measure=lambda model: 10)
    pool.get("a", "float32")
    pool.get("a", "bfloat16")
    assert loads.calls == [("a", "float32"), ("a", "bfloat16")]


def test_least_recently_used_goes_first_under_the_budget():
    pool = ModelPool(budget_bytes=25, load=Loads(), measure=lambda model: 10)
    pool.get("a")
    pool.get("b")
    pool.get("a")  # b is now the least recently used
    lease = pool.get("c")
    assert lease.evicted == ["b"]
    assert pool.keys() == [("a", None), ("c", None)]
    assert pool.pinned_bytes == 20


def test_a_model_larger_than_the_budget_still_loads_alone():
    pool = ModelPool(budget_bytes=5, load=Loads(), measure=lambda model: 10)
    pool.get("a")
    assert pool.get("b").evicted == ["a"]
    assert pool.keys() == [("b", None)]


def test_weight_bytes_reads_shapes_and_dtypes():
    model = SimpleNamespace(
        weights=[
            SimpleNamespace(shape=(4, 8), dtype="float32"),
            SimpleNamespace(shape=(10,), dtype="bfloat16"),
        ]
    )
    assert weight_bytes(model) == 4 * 8 * 4 + 10 * 2


@pytest.mark.parametrize(
    "error, expected",
    [
        (MemoryError(), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_recognised(error, expected):
    assert is_out_of_memory(error) is expected


def test_jobs_are_routed_by_kind_and_by_preset():
    from lmq.core.config import SettingsError, load_settings
    from lmq.workers.celery_app import queue_for, worker_queue

    settings = load_settings({"LMQ_HOME": "/tmp/unused", "LMQ_PRESET_QUEUES": "big-model=a100, tuned=small"})
    assert queue_for("generate", "other", settings) == "lmq.generate"
    assert queue_for("generate", "big-model", settings) == "lmq.generate.a100"
    assert queue_for("fit", "tuned", settings) == "lmq.fit.small"
    assert [worker_queue(q) for q in ("generate", "fit.small", "lmq.generate")] == [
        "lmq.generate",
        "lmq.fit.small",
        "lmq.generate",
    ]
    with pytest.raises(SettingsError, match="LMQ_PRESET_QUEUES entry 'broken'"):
        load_settings({"LMQ_PRESET_QUEUES": "broken"})
