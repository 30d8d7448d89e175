"""The fixed micro-batches that bench/job_throughput.py measures continuous batching against
(how the runner batched a job's prompts before continuous batching)."""

from bench.job_throughput import plan_micro_batches
from lmq.workers.batching import Prompt


def prompts(lengths):
    return [Prompt(index, f"p{index}", length) for index, length in enumerate(lengths)]


def test_micro_batches_group_similar_lengths():
    batches = plan_micro_batches(prompts([5, 1, 9, 2, 6, 1]), max_items=2, max_tokens=1000)
    assert [[p.index for p in batch] for batch in batches] == [[1, 5], [3, 0], [4, 2]]


def test_micro_batches_respect_the_token_budget():
    batches = plan_micro_batches(prompts([10, 10, 10, 30]), max_items=8, max_tokens=40, new_tokens=10)
    # rows x (longest prompt + new tokens) <= 40, and a too-long prompt still runs alone
    assert [[p.index for p in batch] for batch in batches] == [[0, 1], [2], [3]]


def test_every_prompt_is_planned_exactly_once():
    planned = plan_micro_batches(prompts([3, 1, 4, 1, 5, 9, 2, 6]), max_items=3, max_tokens=20)
    assert sorted(p.index for batch in planned for p in batch) == list(range(8))
