"""One engine shared by several groups (jobs): submitted while it runs, each group's results
its own and equal to running it alone, cancellation within one step, fair admission.

The engine is stepped in the test's thread (``step``) where the test looks at each step,
or by its own thread (``start``) with callers waiting in theirs, as on a worker. Nothing
here measures time: the assertions are about what each step holds and what comes out.
"""

import threading

import pytest
import torch

from lmq.core.generation import DecoderOnlyModel, Engine, Request, decode
from lmq.core.samplers import BeamSampler, GreedySampler, PerRequestSampler, TopKSampler
from lmq.plugins.llama.llama_backbone import LlamaBackbone
from model_support import ENGINE_VOCAB, assert_greedy_rows_equal, random_weights

SIZES = dict(
    vocabulary_size=ENGINE_VOCAB, num_layers=2, num_query_heads=4, hidden_dim=32, intermediate_dim=64,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def model():
    return DecoderOnlyModel(random_weights(LlamaBackbone(**SIZES)))


def job(count, seed, longest=20, most_new=10):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=generator).tolist()
    prompts = [torch.randint(0, ENGINE_VOCAB, (n,), generator=generator).tolist() for n in lengths]
    limits = torch.randint(1, most_new + 1, (count,), generator=generator).tolist()
    return prompts, limits


def requests(prompts, limits, seeds=None):
    return [Request(i, p, n, seed=None if seeds is None else seeds[i]) for i, (p, n) in enumerate(zip(prompts, limits))]


def groups_in_batch(engine):
    """The group numbers of the rows decoding now."""
    return set(engine.batch.rows["group"].tolist()) if engine.batch.size else set()


def step_until_done(engine, *groups, each_step=None):
    steps = 0
    while engine.busy:
        engine.step()
        for group in groups:
            group.deliver()
        if each_step is not None:
            each_step(engine)
        steps += 1
    return steps


def test_two_groups_share_steps_and_each_gets_what_it_gets_alone(model):
    """Two 32-prompt groups, one greedy, one of seeded top-k and greedy rows mixed: they decode in
    the same steps, and each group's completions, in order, are those it gets in an engine alone."""
    first, first_limits = job(32, seed=1)
    second, second_limits = job(32, seed=2)
    mixed = PerRequestSampler([TopKSampler(k=5) if i % 2 else GreedySampler() for i in range(32)])
    seeds = list(range(100, 132))
    engine = Engine(model, max_length=64, max_rows=8)
    got = {"first": {}, "second": {}}
    a = engine.submit(requests(first, first_limits), GreedySampler(), on_finish=lambda i, c: got["first"].setdefault(i, c))
    b = engine.submit(requests(second, second_limits, seeds), mixed, on_finish=lambda i, c: got["second"].setdefault(i, c))
    shared_steps = []
    step_until_done(engine, a, b, each_step=lambda e: shared_steps.append(len(groups_in_batch(e)) == 2))

    assert sum(shared_steps) > 10  # the groups' rows were in the same forward passes
    alone_first = decode(model, first, first_limits, GreedySampler())
    mixed_alone = PerRequestSampler([TopKSampler(k=5) if i % 2 else GreedySampler() for i in range(32)])
    alone_second = decode(model, second, second_limits, mixed_alone, seeds=seeds)
    assert_greedy_rows_equal(model, first, a.result().completions, alone_first.completions)
    assert b.result().completions == alone_second.completions
    assert sorted(got["first"]) == list(range(32)) and sorted(got["second"]) == list(range(32))


def test_a_cancelled_group_leaves_within_one_step_and_the_other_is_unchanged(model):
    first, first_limits = job(32, seed=3, longest=30)
    second, second_limits = job(32, seed=4)
    engine = Engine(model, max_length=64, max_rows=8, prefill_chunk=8)
    delivered = []
    a = engine.submit(requests(first, first_limits), GreedySampler(), on_finish=lambda i, c: delivered.append(i))
    b = engine.submit(requests(second, second_limits), GreedySampler())
    while len(delivered) < 6:
        engine.step()
        a.deliver()
        b.deliver()
    assert a.number in groups_in_batch(engine) or any(
        engine.owner.get(p.request.id) is a for p in engine.scheduler.prefilling
    )
    engine.cancel(a)
    engine.step()  # one step: none of its requests waits, prefills or decodes any more
    assert a.number not in groups_in_batch(engine)
    ids = set(a.local)
    assert not ids & {p.request.id for p in engine.scheduler.prefilling}
    assert not ids & set(engine.cache_manager.prefilling)
    assert all(q is not a.queue for q in engine.scheduler.queues)
    assert not ids & set(engine.owner)
    cancelled_at = len(delivered)
    step_until_done(engine, a, b)
    assert len(delivered) == cancelled_at < 32  # nothing of it after the cancel
    assert b.result().completions == decode(model, second, second_limits, GreedySampler()).completions


def test_a_huge_group_does_not_starve_a_small_one_that_comes_later(model):
    """Four rows; a 200-prompt group runs for a while, then an 8-prompt one comes: stride
    scheduling gives them turns, so the small one is done while most of the huge one waits."""
    huge, huge_limits = job(200, seed=5)
    small, small_limits = job(8, seed=6)
    engine = Engine(model, max_length=64, max_rows=4)
    big = engine.submit(requests(huge, huge_limits), GreedySampler())
    for _ in range(10):
        engine.step()
    late = engine.submit(requests(small, small_limits), GreedySampler())
    while not late.done:
        engine.step()
        late.deliver()
    assert len(big.queue.waiting) > 150
    assert late.result().completions == decode(model, small, small_limits, GreedySampler()).completions
    step_until_done(engine, big)
    assert big.result().completions == decode(model, huge, huge_limits, GreedySampler()).completions


def test_priority_weighs_admission_and_a_tenant_holds_its_share_while_another_waits(model):
    prompts, limits = job(24, seed=7)
    engine = Engine(model, max_length=64, max_rows=1)
    urgent = engine.submit(requests(prompts, limits), GreedySampler(), priority=-1)
    normal = engine.submit(requests(prompts, limits), GreedySampler(), priority=0)
    order = []  # the group of each request admitted, one at a time (one row)
    admit = engine.scheduler.admit

    def recorded():
        admitted = admit()
        order.extend("urgent" if engine.owner[r.id] is urgent else "normal" for r in admitted)
        return admitted

    engine.scheduler.admit = recorded
    while len(order) < 30:
        engine.step()
    assert (order[:30].count("urgent"), order[:30].count("normal")) == (20, 10)  # weights 2 : 1

    engine = Engine(model, max_length=64, max_rows=4, tenant_rows=2)
    tenant_x = [engine.submit(requests(prompts, limits), GreedySampler(), tenant="x") for _ in range(2)]
    tenant_y = engine.submit(requests(prompts, limits), GreedySampler(), tenant="y")
    held = []
    engine.step()
    while tenant_y.queue.waiting:
        engine.step()
        held.append(sum(group.queue.in_flight for group in tenant_x))
    assert max(held) == 2  # while y waits, x's two jobs hold two of the four rows between them
    step_until_done(engine, *tenant_x, tenant_y)
    alone = decode(model, prompts, limits, GreedySampler()).completions
    assert all(group.result().completions == alone for group in [*tenant_x, tenant_y])


def test_jobs_in_threads_wait_on_an_engine_with_a_thread_of_its_own(model):
    """As on a worker: the engine steps in its thread, two callers submit from theirs and each
    gets its results; a group whose own sampler fails fails alone; a search is refused."""
    engine = Engine(model, max_length=64, max_rows=6).start()
    try:
        jobs = [job(32, seed=8), job(32, seed=9)]
        results = [None, None]

        def run(i):
            prompts, limits = jobs[i]
            results[i] = decode(model, prompts, limits, GreedySampler(), engine=engine, max_rows=4)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for (prompts, limits), result in zip(jobs, results):
            assert result.completions == decode(model, prompts, limits, GreedySampler()).completions

        prompts, limits = jobs[0]
        with pytest.raises(ValueError, match="has 3 samplers; prompt [0-9]+ has none"):  # 3 samplers for 32 prompts
            decode(model, prompts, limits, PerRequestSampler([GreedySampler()] * 3), engine=engine)
        assert decode(model, prompts, limits, GreedySampler(), engine=engine).completions == results[0].completions
        with pytest.raises(ValueError, match="engine of its own"):
            decode(model, prompts, limits, BeamSampler(num_beams=2), engine=engine)
    finally:
        engine.close()
        engine.thread.join()
