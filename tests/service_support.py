"""What the job tests share: prompts, JSONL files, and the reference outputs.

The reference is `CausalLM.generate` itself, called directly on the preset.
"""

import json
from datetime import timedelta

PROMPTS = [
    "Return the absolute value",
    "The",
    "Create a new list from the items of an iterable, in the order that they are given",
    "Open file and return a stream",
    "Raise",
    "Return a copy of the string with leading and trailing whitespace removed",
]


def reference(preset, prompts, **arguments):
    from lmq.core.models import CausalLM

    lm = CausalLM.from_preset(str(preset))
    lm.compile(sampler="greedy")
    return [
        {
            "output": g.text,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            "finish_reason": g.finish_reason,
        }
        for g in lm.generate(prompts, return_details=True, **arguments)
    ]


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def lease_runs_out(factory, job_id):
    """What LMQ_LEASE_S of silence from a job's worker does (the worker died or was paused)."""
    from sqlalchemy import update

    from lmq.core.store import Job, session_scope
    from lmq.core.store.models import utcnow

    with session_scope(factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
