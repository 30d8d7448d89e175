"""Generate jobs running at once on one worker share its model's engine (workers/pool.py):
two 32-prompt jobs decode in the same steps and each gets its results complete, in input
order, equal to generating its prompts alone; cancelling one leaves the other's unchanged.

The jobs run as a worker runs them, each in a thread of its own through one JobRunner (what
`lmq worker`'s thread pool and `lmq serve`'s in-process worker do), on a tiny real model.
"""

import functools
import threading
import time

from service_support import reference
from worker_support import MANY_PROMPTS

from lmq.core.config import load_settings
from lmq.core.store import queries, session_scope, sessions
from lmq.workers.batching import shared_engine
from lmq.workers.pool import ModelPool, load_task, weight_bytes
from lmq.workers.runner import JobRunner

FIRST = MANY_PROMPTS[:32]
SECOND = MANY_PROMPTS[8:40][::-1]


def submit(factory, preset, prompts, **params):
    with session_scope(factory) as session:
        inputs = [{"custom_id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)]
        return queries.create_generate_job(session, preset=str(preset), inputs=inputs, params=params).id


def state(factory, job_id):
    with session_scope(factory) as session:
        job = queries.get_job(session, job_id)
        return job.state, job.completed


def outputs(factory, job_id):
    with session_scope(factory) as session:
        return [(item.index, item.output, item.error) for item in queries.job_items(session, job_id)]


def gated_runner(settings):
    """A runner whose model loads once `loading` is set: the test lets the first job load only
    when the second has been claimed, so both submit their rows to the engine together."""
    loading = threading.Event()

    def load(location, dtype):
        loading.wait()
        return load_task(location, dtype)

    pool = ModelPool(2**30, load=load, engine_for=functools.partial(shared_engine, settings=settings))
    return JobRunner(settings, pool), loading


def run_together(runner, loading, factory, job_ids):
    """Runs the jobs at once, each in its thread; the model loads once all are claimed."""
    ended = {}
    threads = [threading.Thread(target=lambda j=j: ended.update({j: runner.run(j)})) for j in job_ids]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while any(state(factory, j)[0] != "running" for j in job_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    loading.set()
    return threads, ended


def test_two_jobs_on_one_worker_share_the_engine_and_each_gets_its_results_alone(lmq_home, tiny_llama_preset):
    settings = load_settings()
    factory = sessions(settings)
    runner, loading = gated_runner(settings)
    first = submit(factory, tiny_llama_preset, FIRST, max_length=48)
    second = submit(factory, tiny_llama_preset, SECOND, max_length=48)
    threads, ended = run_together(runner, loading, factory, [first, second])
    for thread in threads:
        thread.join()

    assert ended == {first: "succeeded", second: "succeeded"}
    engine = runner.pool.get(str(tiny_llama_preset)).engine
    assert engine.shared_steps > 0  # both jobs' rows were in the same forward passes
    for job_id, prompts in ((first, FIRST), (second, SECOND)):
        expected = [e["output"] for e in reference(tiny_llama_preset, prompts, max_length=48)]
        assert outputs(factory, job_id) == [(i, text, None) for i, text in enumerate(expected)]


def test_cancelling_one_job_leaves_the_other_unchanged(lmq_home, tiny_llama_preset):
    settings = load_settings()
    factory = sessions(settings)
    runner, loading = gated_runner(settings)
    doomed = submit(factory, tiny_llama_preset, MANY_PROMPTS * 4, max_length=64)
    kept = submit(factory, tiny_llama_preset, FIRST, max_length=48)
    threads, ended = run_together(runner, loading, factory, [doomed, kept])
    deadline = time.monotonic() + 120
    while state(factory, doomed)[1] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    with session_scope(factory) as session:
        queries.request_cancel(session, doomed)
    for thread in threads:
        thread.join()

    assert ended == {doomed: "cancelled", kept: "succeeded"}
    assert state(factory, doomed)[1] < len(MANY_PROMPTS) * 4
    expected = [e["output"] for e in reference(tiny_llama_preset, FIRST, max_length=48)]
    assert outputs(factory, kept) == [(i, text, None) for i, text in enumerate(expected)]
    engine = runner.pool.get(str(tiny_llama_preset)).engine
    deadline = time.monotonic() + 10
    while engine.busy and time.monotonic() < deadline:  # the cancel is taken at the engine's next step
        time.sleep(0.01)
    assert not engine.busy and not engine.groups and not engine.owner  # nothing of the cancelled job is left


def test_the_shared_engine_is_sized_by_the_settings(lmq_home, tiny_llama_preset, monkeypatch):
    """The engine's rows are LMQ_MICRO_BATCH_SIZE's and a tenant's bound LMQ_TENANT_ROW_SHARE of them,
    whatever a job asks; a share above 1 is refused, naming the variable."""
    import pytest

    from lmq.core.config import SettingsError

    monkeypatch.setenv("LMQ_MICRO_BATCH_SIZE", "12")
    monkeypatch.setenv("LMQ_TENANT_ROW_SHARE", "0.25")
    settings = load_settings()
    engine = shared_engine(load_task(str(tiny_llama_preset), None), settings)
    try:
        assert (engine.max_rows, engine.tenant_rows, engine.max_length) == (12, 3, settings.limits.max_length)
    finally:
        engine.close()
    monkeypatch.setenv("LMQ_TENANT_ROW_SHARE", "2")
    with pytest.raises(SettingsError, match="LMQ_TENANT_ROW_SHARE"):
        load_settings()


def test_a_job_whose_model_is_evicted_mid_way_finishes_in_an_engine_of_its_own(lmq_home, tiny_llama_preset, tmp_path):
    """Another job pins a second model into a pool with room for one: the first model is evicted and
    its shared engine closed while the first job still has windows to run. The job goes on with
    the model it holds, in an engine of its own, and gets every result."""
    import shutil

    settings = load_settings()
    factory = sessions(settings)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_preset, other)
    room_for_one = weight_bytes(load_task(str(tiny_llama_preset), None)) * 3 // 2
    pool = ModelPool(room_for_one, engine_for=functools.partial(shared_engine, settings=settings))
    evictions = []

    def evict_after_the_first_window(done, total, **details):
        if not evictions:
            evictions.append(pool.get(str(other)).evicted)

    runner = JobRunner(settings, pool, on_progress=evict_after_the_first_window)
    runner.planning_window = 8
    job_id = submit(factory, tiny_llama_preset, FIRST[:20], max_length=48)
    assert runner.run(job_id) == "succeeded"
    assert evictions == [[str(tiny_llama_preset)]]
    expected = [e["output"] for e in reference(tiny_llama_preset, FIRST[:20], max_length=48)]
    assert outputs(factory, job_id) == [(i, output, None) for i, output in enumerate(expected)]
    assert pool.keys() == [(str(other), None)]
