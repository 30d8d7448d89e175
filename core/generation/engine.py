"""The decode engine: one loop for every sampler and model, split the way vLLM's engine is.

- a ``Request`` (``request.py``) is plain data: prompt ids, limit, seed, stops, priority;
- the ``Scheduler`` (``scheduler.py``) owns the waiting queue and, each step, a token
  budget shared by the decoding rows (a token each) and prompt chunks;
- the ``KVCacheManager`` (``kv_cache_manager.py``) allocates, frees and moves the
  requests' cache row slots, and copies prompt blocks to and from the ``PrefixCache``
  (``prefix_cache.py``), so prompts that share leading tokens compute their KV once;
- a ``StepInput`` (``input_batch.py``) is one step's tokens, flattened, as typed tensors;
- the ``ModelRunner`` (``runner.py``) runs it through the model: hidden states, logits;
- the running ``Batch`` (``batch.py``) holds the decoding rows, which the sampler acts on.

Each step:

    while waiting or in flight:
        batch.admit(scheduler.admit())              # requests join while the cache has room
        plan = scheduler.schedule(batch.decode_rows)  # decoding rows + prompt chunks, in budget
        hidden = runner.run(cache, step input)      # one forward pass
        batch.logits = ...; batch.join(ready, ...)  # decoding rows' logits; prompts that are in join
        tokens = sampler.choose(batch, batch.take_logits())
        batch.append(tokens, sampler.completed_rows())  # stop tokens, complete grammars, limits, stop strings, streaming
        batch.drop_finished()                       # finished requests leave; their slots are reused

Samplers are strategies (``lmq.core.samplers``): a token sampler (greedy, top-k,
top-p, random) picks from the logits; beam search ranks (beam x vocabulary)
candidate sequences and reorders the rows with ``batch.select``; contrastive
search runs its candidates through ``batch.look_ahead`` and keeps the best, leaving
the rows' next logits (so the next step runs no decode tokens for them). Beam and
contrastive take several rows per request (``rows_per_prompt``); a request finishes
when all its rows have, and ``sampler.finish`` makes its result.

An encoder-decoder model (Bart) is another model object with the calls of
``DecoderOnlyModel``: its cache also holds each request's cross-attention keys and
values, which its ``prefill`` writes from the encoder (inputs kept by the model, looked
up by the request ids of the chunks), and the cache's ``move_rows``, ``select_rows``
and ``take`` move both parts, so beams, finished rows and joining ones just work.
"""

import torch

from lmq.core.generation.batch import Batch
from lmq.core.generation.kv_cache_manager import KVCacheManager
from lmq.core.generation.prefix_cache import PrefixCache
from lmq.core.generation.request import Request
from lmq.core.generation.runner import ModelRunner
from lmq.core.generation.scheduler import PREFILL_CHUNK, Scheduler


class Engine:
    """One decoding job: its requests, scheduler, cache, runner and running batch."""

    def __init__(self, model, sampler, requests, stream=None, on_finish=None, max_rows=None,
                 max_cache_tokens=None, prefill_chunk=PREFILL_CHUNK, step_tokens=None, prefix_cache=True):
        if (max_rows is not None and max_rows < 1) or (max_cache_tokens is not None and max_cache_tokens < 1):
            raise ValueError(
                f"The row budget must be positive: max_rows={max_rows}, max_cache_tokens={max_cache_tokens}."
            )
        self.sampler = sampler
        rows_per_request = sampler.rows_per_prompt(model.backbone.token_embedding.embeddings.shape[0])
        max_requests = min(max_rows or len(requests), max(len(requests), 1))
        max_length = max((r.need for r in requests), default=0)
        if not getattr(model, "chunked_prefill", False):  # whole prompts only
            prefill_chunk = None
        in_flight_positions = max_requests * rows_per_request * max_length  # the most the slots can hold
        self.prefix_cache = self._prefix_cache(
            prefix_cache, prefill_chunk is not None, requests, max_cache_tokens, in_flight_positions
        )
        if self.prefix_cache is not None and max_cache_tokens is not None:
            max_cache_tokens -= self.prefix_cache.max_tokens
        self.cache_manager = KVCacheManager(
            model, rows_per_request, max_length, max((len(r.prompt) for r in requests), default=0),
            max_requests=max_requests, max_cache_tokens=max_cache_tokens, prefix_cache=self.prefix_cache,
        )
        self.scheduler = Scheduler(
            requests, self.cache_manager, max_requests * rows_per_request, prefill_chunk, step_tokens
        )
        self.runner = ModelRunner(model)
        stop_width = max((len(r.stop_token_ids) for r in requests), default=0)
        any_stop_strings = any(r.stop_strings is not None for r in requests)
        self.batch = Batch(
            model, self.runner, self.cache_manager, sampler, max_length, stop_width, any_stop_strings, stream, on_finish
        )

    def _prefix_cache(self, prefix_cache, chunked, requests, max_cache_tokens, in_flight_positions):
        """The ``PrefixCache`` this engine reads and writes, or None. ``prefix_cache``: True
        (one of its own: a quarter of ``max_cache_tokens``; without that budget, as many
        positions as the requests in flight hold, at most every prompt's), False, or a
        ``PrefixCache`` the caller keeps across engines. Its positions come out of
        ``max_cache_tokens``. None where caching does not apply: a model that cannot continue
        a prompt (an encoder-decoder, whose decoder keys also depend on its encoder's input)
        or a sampler that reads the prompts' hidden states (contrastive search)."""
        if prefix_cache is False or not chunked or self.sampler.reads_prompt_states:
            return None
        if prefix_cache is True:
            if max_cache_tokens is None:
                prefix_cache = PrefixCache(min(sum(len(r.prompt) for r in requests), in_flight_positions))
            else:
                prefix_cache = PrefixCache.within(max_cache_tokens)
        if max_cache_tokens is not None and prefix_cache.max_tokens >= max_cache_tokens:
            raise ValueError(
                f"A prefix cache of {prefix_cache.max_tokens} positions leaves no room in "
                f"max_cache_tokens={max_cache_tokens}."
            )
        return prefix_cache if prefix_cache.capacity else None

    def run(self, between_steps=None):
        """Decodes every request; a ``DecodeResult``. ``between_steps()`` is called before
        each step (a job runner checks for cancellation there; what it raises ends the job)."""
        scheduler, batch = self.scheduler, self.batch
        while scheduler.busy or batch.size:
            if between_steps is not None:
                between_steps()
            batch.admit(scheduler.admit())
            plan = scheduler.schedule(batch.decode_rows)
            if plan.tokens:
                self._forward(plan)
            if batch.size:
                tokens = self.sampler.choose(batch, batch.take_logits())
                batch.append(tokens, self.sampler.completed_rows())
                longest = batch.drop_finished()
                if longest is not None:
                    scheduler.finished(longest)
        return batch.result()

    def _forward(self, plan):
        """One forward pass over the plan's tokens: the decoding rows' next logits, and the
        requests whose prompts are now in join them with theirs."""
        chunks = [
            (self.cache_manager.first_slot(p.request.id), start, p.request.prompt[start:stop], p.request.id)
            for p, start, stop in plan.chunks
        ]
        hidden = self.runner.run(self.cache_manager.cache, self.batch.step_input(chunks))  # [tokens, hidden]
        ready = self.scheduler.prefilled(plan, hidden[plan.decode_rows :])
        wanted = [hidden[: plan.decode_rows]] + [p.hidden[-1][1][-1:] for p in ready]  # the tokens to sample after
        logits = self.runner.logits(torch.cat(wanted))
        if plan.decode_rows:
            self.batch.logits = logits[: plan.decode_rows]
        if ready:
            self.batch.join(ready, logits[plan.decode_rows :])


@torch.inference_mode()
def decode(
    model,
    prompts,
    limits,
    sampler,
    stop_token_ids=(),
    seeds=None,
    stop_strings=None,
    stream=None,
    on_finish=None,
    max_rows=None,
    max_cache_tokens=None,
    between_steps=None,
    prefill_chunk=PREFILL_CHUNK,
    step_tokens=None,
    priorities=None,
    adapters=None,
    prefix_cache=True,
):
    """Generates up to ``limits[i]`` tokens after ``prompts[i]`` (lists of ids); a ``DecodeResult``.

    ``model`` is the model side (``DecoderOnlyModel``); ``seeds[i]`` seeds request i's own
    random generator; ``stop_token_ids``: the ids every request stops at, or a list of each
    one's; ``stop_strings[i]``: request i's ``StopStrings`` or None; ``stream(request, token_id)``
    receives each new token and ``on_finish(request, completion)`` each result as its request
    finishes; ``between_steps()`` is called before each step.

    The budget: at most ``max_rows`` requests in flight, and at most ``max_cache_tokens``
    KV-cache positions (requests in flight x the positions the longest of them needs).
    The others wait (by ``priorities[i]``, lower first, then shortest prompt first) and join
    as finished ones leave. Each forward pass takes at most ``step_tokens`` tokens (default:
    the rows in flight + ``prefill_chunk``): the decoding rows' and at most ``prefill_chunk``
    prompt tokens of the requests being prefilled. ``adapters``: an adapter name (of ``model``'s,
    see ``DecoderOnlyModel``) for every request, or a list of one per request (None: the base alone).

    ``prefix_cache``: prompt blocks computed once are reused by the requests that share
    them, never across adapters (``Engine._prefix_cache``: True, False, or a ``PrefixCache``
    kept across calls).
    """
    if not isinstance(adapters, (list, tuple)):
        adapters = [adapters] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"adapter has {len(adapters)} names for {len(prompts)} prompts; give one per prompt or one.")
    if not any(isinstance(ids, (list, tuple)) for ids in stop_token_ids):
        stop_token_ids = [stop_token_ids] * len(prompts)
    requests = [
        Request(
            i, list(prompt), limit, seed=None if seeds is None else seeds[i], stop_token_ids=tuple(stop_token_ids[i]),
            stop_strings=None if stop_strings is None else stop_strings[i],
            priority=0 if priorities is None else priorities[i], adapter=adapters[i],
        )
        for i, (prompt, limit) in enumerate(zip(prompts, limits))
    ]
    engine = Engine(
        model, sampler, requests, stream, on_finish, max_rows, max_cache_tokens, prefill_chunk, step_tokens,
        prefix_cache,
    )
    return engine.run(between_steps)
