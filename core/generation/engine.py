"""The one decode loop: every sampler, every model, through the same steps.

Each step the sampler chooses one token per row from the rows' logits, the
batch appends them (stop tokens, token limits, stop strings and streaming are
handled there, once), requests whose rows have all finished leave the batch,
and the model runs the new tokens one step:

    while waiting or batch.busy:
        batch.add(...)                              # requests join while slots are free
        batch.prefill()                             # their prompts (a chunk per step) into the cache
        tokens = sampler.choose(batch, batch.take_logits())
        batch.append(tokens)
        batch.drop_finished()
        if batch.size and batch.logits is None:     # a look-ahead sampler left them
            batch.step()                            # the next logits

Samplers are strategies (``lmq.core.samplers``): a token sampler (greedy, top-k,
top-p, random) picks from the logits; beam search ranks (beam x vocabulary)
candidate sequences and reorders the rows with ``batch.select``; contrastive
search runs its candidates through ``batch.look_ahead`` and keeps the best.
Beam and contrastive take several rows per request (``rows_per_prompt``); a
request finishes when all its rows have, and ``sampler.finish`` makes its result.

How the two next kinds of generation plug in, without a second loop:

- An encoder-decoder model (Bart) is another model object with the calls of
  ``DecoderOnlyModel``: its cache also holds each row's cross-attention keys and
  values; ``prefill`` runs the encoder once over the requests' encoder tokens
  (kept by the model, looked up by the request ids it receives), writes those keys
  and values, and prefills the decoder start tokens, which are the prompt the engine
  sees; ``step`` runs one decoder token per row against both; the cache's
  ``move_rows``, ``select_rows`` and ``take`` move both parts, so beams, finished
  rows and joining ones just work.
- A continuously refilled batch keeps one ``Batch`` for the whole job and runs
  this same loop. Its cache has a slot per row in flight (``lmq.core.layers.cache``):
  between steps, after ``drop_finished`` has taken finished requests out (their
  results are in ``batch.completions`` from then on, the last rows moved into the
  freed slots), ``batch.add`` reserves slots for waiting prompts and ``batch.prefill``
  runs their prompts in, a chunk of at most ``prefill_chunk`` tokens per step, so a
  long prompt does not stall the others; a request whose prompt is in joins the
  decoding rows with its next logits, at its own position. ``decode(..., max_rows=n,
  max_cache_tokens=t)`` does this within a budget of rows and cache positions,
  admitting the shortest waiting prompts first (several at once when several slots
  are free), and hands each result to ``on_finish`` as its request finishes.
"""

from collections import deque

import torch

from lmq.core.generation.batch import PREFILL_CHUNK, Batch


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
):
    """Generates up to ``limits[i]`` tokens after ``prompts[i]`` (lists of ids); a ``DecodeResult``.

    ``model`` is the model side (``DecoderOnlyModel``); ``seeds[i]`` seeds request i's own
    random generator; ``stream(request, token_id)`` receives each new token and
    ``on_finish(request, completion)`` each result as its request finishes; ``stop_strings``
    is a ``StopStrings``; ``between_steps()`` is called before each step (a job runner
    checks for cancellation there; what it raises ends the decoding).

    The budget: at most ``max_rows`` requests in flight, and at most ``max_cache_tokens``
    KV-cache positions (requests in flight x the positions the longest of them needs).
    The others wait, shortest prompt first (neighbours of similar length pad little),
    and join as finished ones leave. ``prefill_chunk``: the most prompt tokens prefilled
    between two decode steps.
    """
    if (max_rows is not None and max_rows < 1) or (max_cache_tokens is not None and max_cache_tokens < 1):
        raise ValueError(f"The row budget must be positive: max_rows={max_rows}, max_cache_tokens={max_cache_tokens}.")
    room = (
        max((len(p) + limit for p, limit in zip(prompts, limits)), default=0),
        max((len(p) for p in prompts), default=0),
    )
    max_rows = min(max_rows or len(prompts), max(len(prompts), 1))
    waiting = deque(sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i)))
    batch = Batch(
        model, sampler, stop_token_ids, seeds, stop_strings, stream, on_finish,
        room=room, max_rows=max_rows, max_cache_tokens=max_cache_tokens, prefill_chunk=prefill_chunk,
    )
    while waiting or batch.busy:
        if between_steps is not None:
            between_steps()
        joining, longest = [], batch.longest
        while waiting:  # rows join between steps, as many as the budget holds
            need = len(prompts[waiting[0]]) + limits[waiting[0]]
            if not batch.fits(len(joining) + 1, max(longest, need)):
                break
            joining.append(waiting.popleft())
            longest = max(longest, need)
        if joining:
            batch.add([prompts[i] for i in joining], [limits[i] for i in joining], joining)
        if batch.joining:
            batch.prefill()
        if batch.size:
            tokens = sampler.choose(batch, batch.take_logits())
            batch.append(tokens)
            batch.drop_finished()
            if batch.size and batch.logits is None:
                batch.step()
    return batch.result()
