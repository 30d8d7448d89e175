"""The engine's scheduling: the token budget of each step, prompts in chunks, no request left waiting.

The scheduler alone (with a cache manager that counts requests), then the whole engine
on a tiny random Llama, each forward pass recorded: what the steps held, and that every
request got the tokens it gets decoded alone.
"""

import pytest
import torch

from lmq.core.generation import DecoderOnlyModel, ModelRunner, Request, Scheduler, decode
from lmq.core.samplers import GreedySampler
from model_support import ENGINE_VOCAB, engine_backbones, random_weights

VOCAB = ENGINE_VOCAB


class CountingCacheManager:
    """Room for ``most`` requests in flight; a request leaves when the test says so."""

    prefix_cache = None

    def __init__(self, most):
        self.most, self.in_flight = most, 0

    def fits(self, more, longest):
        return self.in_flight + more <= self.most

    def allocate(self, requests, longest):
        self.in_flight += len(requests)


def requests(lengths, limit=4, priorities=None):
    return [
        Request(i, [1] * n, limit, priority=0 if priorities is None else priorities[i]) for i, n in enumerate(lengths)
    ]


def run_prefills(scheduler, decode_rows, steps):
    """``steps`` steps with ``decode_rows`` rows decoding: each step's plan, prompts recorded as done."""
    plans = []
    for _ in range(steps):
        scheduler.admit()
        plan = scheduler.schedule(decode_rows)
        plans.append(plan)
        scheduler.prefilled(plan, torch.zeros(plan.tokens - decode_rows, 1))
    return plans


def test_each_step_keeps_to_its_token_budget_decoding_rows_first():
    scheduler = Scheduler(requests([30, 5, 9, 40]), CountingCacheManager(8), max_rows=8, prefill_chunk=16, step_tokens=12)
    plans = run_prefills(scheduler, decode_rows=5, steps=20)
    assert all(plan.tokens <= 12 and plan.decode_rows == 5 for plan in plans)
    assert sum(plan.tokens - 5 for plan in plans) == 30 + 5 + 9 + 40  # every prompt went in, a chunk at a time
    assert not scheduler.busy


def test_a_long_prompt_goes_in_over_several_steps_beside_the_decoding_rows():
    scheduler = Scheduler(requests([40]), CountingCacheManager(4), max_rows=4, prefill_chunk=8)
    plans = run_prefills(scheduler, decode_rows=3, steps=5)
    assert [(start, stop) for plan in plans for _, start, stop in plan.chunks] == [
        (0, 8), (8, 16), (16, 24), (24, 32), (32, 40)
    ]
    assert all(plan.decode_rows == 3 for plan in plans)


def test_the_oldest_prefilling_request_moves_on_every_step_so_none_waits_forever():
    """A budget nearly used up by decoding rows still leaves the oldest prompt a token."""
    scheduler = Scheduler(requests([6, 3, 5]), CountingCacheManager(3), max_rows=3, prefill_chunk=4, step_tokens=4)
    plans = run_prefills(scheduler, decode_rows=3, steps=14)
    progress = [[(request.request.id, start) for request, start, _ in plan.chunks] for plan in plans]
    assert all(len(step) == 1 for step in progress[:14])  # one token a step
    assert [step[0][0] for step in progress] == [1] * 3 + [2] * 5 + [0] * 6  # admitted shortest first, in order
    assert not scheduler.busy


def test_waiting_requests_join_by_priority_then_shortest_prompt():
    scheduler = Scheduler(
        requests([9, 3, 7, 5], priorities=[1, 1, 0, 0]), CountingCacheManager(2), max_rows=2, prefill_chunk=64
    )
    assert [r.id for r in scheduler.admit()] == [3, 2]
    scheduler.cache_manager.in_flight = 0  # both finished
    assert [r.id for r in scheduler.admit()] == [1, 0]


def test_a_step_budget_that_leaves_no_prompt_tokens_is_refused():
    with pytest.raises(ValueError, match="step_tokens=4 leaves no prompt tokens beside 4 decoding rows"):
        Scheduler(requests([3]), CountingCacheManager(4), max_rows=4, step_tokens=4)


# -- the engine, step by step -----------------------------------------------------------



BACKBONES = engine_backbones()


@pytest.fixture(scope="module", params=list(BACKBONES))
def model(request):
    return DecoderOnlyModel(random_weights(BACKBONES[request.param]()))


@pytest.fixture
def steps(monkeypatch):
    """Every forward pass's ``StepInput``, in order."""
    recorded = []
    run = ModelRunner.run

    def recording_run(self, cache, step):
        recorded.append(step)
        return run(self, cache, step)

    monkeypatch.setattr(ModelRunner, "run", recording_run)
    return recorded


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps_with_tokens_as_alone(model, steps):
    """Three short requests decode while a 45-token prompt goes in, at most 16 tokens a
    step including the decoding rows; every request's tokens are those it gets alone."""
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in (3, 4, 5, 45)]
    limits = [14, 14, 14, 6]
    joined = decode(model, prompts, limits, GreedySampler(), step_tokens=16)
    shared = [s for s in steps if s.decode_rows and s.chunks]
    long_chunks = [chunk for s in steps for chunk, request in zip(s.chunks, s.requests) if request == 3]
    assert all(s.tokens <= 16 for s in steps)
    assert len(long_chunks) >= 3 and sum(length for *_, length in long_chunks) == 45
    assert len(shared) >= 3  # the long prompt went in beside the others' decode tokens, in one forward pass each
    steps.clear()
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        assert joined.completions[i] == decode(model, [prompt], [limit], GreedySampler()).completions[0]


def test_every_request_finishes_with_its_tokens_alone_under_a_tight_budget(model, steps):
    """Twelve requests, three rows in flight, five tokens a step: no request is left waiting,
    and each gets the greedy tokens it gets alone."""
    generator = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in range(1, 25, 2)]
    limits = [3 + i % 5 for i in range(len(prompts))]
    joined = decode(model, prompts, limits, GreedySampler(), max_rows=3, step_tokens=5)
    assert all(s.tokens <= 5 for s in steps)
    assert all(len(c) == n for c, n in zip(joined.completions, limits))
    for i, (prompt, limit) in enumerate(zip(prompts, limits)):
        assert joined.completions[i] == decode(model, [prompt], [limit], GreedySampler()).completions[0]
