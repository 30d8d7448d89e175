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

Requests come in groups, one per ``submit`` (a job's prompts, with the job's sampler and
callbacks), while the engine runs: ``decode`` makes an engine for one group and steps it
in the caller's thread; a worker keeps one engine per pinned model, stepped by a thread of
its own (``start``), into which every job on that model submits its requests, so they
share each step (see "Groups" below). Each step:

    while waiting or in flight:
        take submitted groups in, cancelled ones out     # within one step of ``cancel``
        batch.admit(scheduler.admit())              # requests join while the cache has room, fairly by group
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

Groups. A request's id is the engine's; its group knows it by its own number (the
index of its prompt in the ``submit`` call), and so do the group's sampler, callbacks and
result. Each step the rows of each group choose their tokens with their group's sampler
(``GroupSampler``), which sees only its rows, numbered its own way; a group's results are
delivered to its ``on_finish`` in the thread that waits for it (``Group.wait``), so a job's
writes, lease checks and cancellation stay in its own thread. Token samplers mix freely; a
search (beam, contrastive) moves and reads whole rows of the batch, so it runs in an
engine of its own (``decode``), never in a shared one. An error in a step fails every group
in flight (an error a group's own sampler raises fails that group alone); the engine then
starts afresh and goes on with the groups submitted after.

An encoder-decoder model (Bart) is another model object with the calls of
``DecoderOnlyModel``: its cache also holds each request's cross-attention keys and
values, which its ``prefill`` writes from the encoder (inputs kept by the model, looked
up by the request ids of the chunks), and the cache's ``move_rows``, ``select_rows``
and ``take`` move both parts, so beams, finished rows and joining ones just work.
"""

import dataclasses
import itertools
import threading
import weakref
from collections import deque
from collections.abc import Mapping

import torch

from lmq.core.generation.batch import Batch
from lmq.core.generation.kv_cache_manager import KVCacheManager
from lmq.core.generation.prefix_cache import PrefixCache
from lmq.core.generation.request import Request
from lmq.core.generation.results import Completion, DecodeResult
from lmq.core.generation.runner import ModelRunner
from lmq.core.generation.scheduler import PREFILL_CHUNK, Scheduler


class EngineClosed(RuntimeError):
    """A group submitted to an engine after ``close`` (its model was evicted from a worker's pool)."""


class Group:
    """One ``submit`` call's requests in an engine: their sampler, callbacks and results, each
    request known by its own number (its prompt's index in the call)."""

    def __init__(self, engine, number, sampler, requests, on_finish, stream, priority, tenant, max_rows):
        """``requests``: the group's, already numbered as the engine numbers them."""
        self.engine, self.number, self.sampler = engine, number, sampler
        self.requests, self.size = requests, len(requests)
        self.on_finish, self.stream = on_finish, stream
        self.priority, self.tenant, self.max_rows = priority, tenant, max_rows
        self.local = {r.id: i for i, r in enumerate(requests)}  # engine request id -> its number here
        self.queue = None  # its scheduler Queue, once the engine has taken it in
        self.arrived = deque()  # (number, Completion) finished, not yet delivered
        self.completions = {}  # number -> Completion, delivered
        self.error = None  # what failed it
        self.cancelled = False

    @property
    def done(self):
        """All its results delivered (or it failed, or was cancelled)."""
        return self.cancelled or self.error is not None or (len(self.completions) == self.size and not self.arrived)

    def deliver(self):
        """Hands the results that arrived to ``on_finish``, in the calling thread."""
        while self.arrived:
            number, completion = self.arrived.popleft()
            self.completions[number] = completion
            if self.on_finish is not None:
                self.on_finish(number, completion)

    def wait(self, between_steps=None):
        """Waits, while another thread steps the engine, until every request of the group has
        finished; its ``DecodeResult``. ``between_steps()`` is called after each step of the
        engine: what it (or ``on_finish``) raises cancels the group and ends the wait."""
        try:
            while True:
                if between_steps is not None:
                    between_steps()
                with self.engine.condition:
                    if not self.arrived and not self.done:
                        self.engine.condition.wait(timeout=1.0)  # woken after each step
                self.deliver()
                if self.error is not None:
                    raise self.error
                if self.done:
                    return self.result()
        except BaseException:
            self.engine.cancel(self)
            raise

    def result(self):
        return DecodeResult.of([self.completions[number] for number in range(self.size)])


class Engine:
    """The decode loop: groups of requests in, one forward pass per step, results out.

    Sized by its budget, not by any group's requests: ``max_rows`` requests and
    ``max_cache_tokens`` KV-cache positions in flight at most, each request at most
    ``max_length`` positions (prompt and completion), ``rows_per_request`` rows each (one;
    a search's engine: one per beam or candidate). ``tenant_rows``: the most requests one
    tenant holds in flight while another tenant's wait. ``prefix_cache``: prompt blocks
    computed once are reused by the requests that share them (``_prefix_cache``).
    """

    def __init__(self, model, max_length, max_rows, *, rows_per_request=1, prompt_width=None, max_cache_tokens=None,
                 prefill_chunk=PREFILL_CHUNK, step_tokens=None, tenant_rows=None, prefix_cache=True):
        if max_rows < 1 or (max_cache_tokens is not None and max_cache_tokens < 1):
            raise ValueError(
                f"The row budget must be positive: max_rows={max_rows}, max_cache_tokens={max_cache_tokens}."
            )
        self.model = model
        self.max_length, self.max_rows, self.max_cache_tokens = max_length, max_rows, max_cache_tokens
        self.rows_per_request, self.prompt_width = rows_per_request, prompt_width or max_length
        if not getattr(model, "chunked_prefill", False):  # whole prompts only
            prefill_chunk = None
        self.prefill_chunk, self.step_tokens, self.tenant_rows = prefill_chunk, step_tokens, tenant_rows
        self.prefix_cache = self._prefix_cache(prefix_cache)
        if self.prefix_cache is not None and max_cache_tokens is not None:
            self.max_cache_tokens -= self.prefix_cache.max_tokens
        self.runner = ModelRunner(model)
        self.sampler = GroupSampler(self)
        self.groups = {}  # number -> Group, those taken in and not done
        self.owner = {}  # request id in flight or waiting -> its Group
        self.condition = threading.Condition()  # guards what follows; notified after each step
        self.incoming, self.leaving = [], []  # groups submitted, cancelled: applied at the next step
        self.closed = False
        self.last_error = None
        self.shared_steps = 0  # steps whose rows came from more than one group
        self._group_numbers, self._request_ids = itertools.count(), itertools.count()
        self.thread = None
        self._reset()

    def _prefix_cache(self, prefix_cache):
        """The ``PrefixCache`` this engine reads and writes (it outlives ``_reset``), or None.
        ``prefix_cache``: True (one of its own: a quarter of ``max_cache_tokens``; without that
        budget, as many positions as its rows hold), False, or a ``PrefixCache`` the caller
        keeps. Its positions come out of ``max_cache_tokens``. None where caching does not
        apply: a model that cannot continue a prompt (an encoder-decoder, whose decoder keys
        also depend on its encoder's input)."""
        if prefix_cache is False or self.prefill_chunk is None:
            return None
        if prefix_cache is True:
            if self.max_cache_tokens is None:
                prefix_cache = PrefixCache(self.max_rows * self.rows_per_request * self.max_length)
            else:
                prefix_cache = PrefixCache.within(self.max_cache_tokens)
        if self.max_cache_tokens is not None and prefix_cache.max_tokens >= self.max_cache_tokens:
            raise ValueError(
                f"A prefix cache of {prefix_cache.max_tokens} positions leaves no room in "
                f"max_cache_tokens={self.max_cache_tokens}."
            )
        return prefix_cache if prefix_cache.capacity else None

    def _reset(self):
        """An empty cache, scheduler and batch (at start, and after a failed step)."""
        if self.prefix_cache is not None:  # no row in flight reads its blocks (one engine at a time uses a pool)
            self.prefix_cache.pins.clear()
        self.cache_manager = KVCacheManager(
            self.model, self.rows_per_request, self.max_length, self.prompt_width,
            max_requests=self.max_rows, max_cache_tokens=self.max_cache_tokens, prefix_cache=self.prefix_cache,
        )
        self.scheduler = Scheduler(
            [], self.cache_manager, self.max_rows * self.rows_per_request, self.prefill_chunk, self.step_tokens,
            self.tenant_rows,
        )
        # Held weakly, as GroupSampler holds the engine: no cycle, so an engine dropped frees its
        # KV cache at once rather than at the next garbage collection.
        finished = weakref.WeakMethod(self._finished)
        self.batch = Batch(self.model, self.runner, self.cache_manager, self.sampler, self.max_length,
                           on_finish=lambda request, completion: finished()(request, completion))

    @classmethod
    def for_requests(cls, model, sampler, requests, max_rows=None, max_cache_tokens=None, prefill_chunk=PREFILL_CHUNK,
                     step_tokens=None, prefix_cache=True):
        """An engine sized for ``requests`` alone, decoded with ``sampler`` (``decode``'s): as long
        as the longest needs, at most ``max_rows`` of them in flight (default: all)."""
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"The row budget must be positive: max_rows={max_rows}.")
        max_length = max((r.need for r in requests), default=0)
        max_requests = max(1, min(max_rows or len(requests), len(requests)))
        rows_per_request = sampler.rows_per_prompt(model.backbone.token_embedding.embeddings.shape[0])
        if sampler.reads_prompt_states:
            prefix_cache = False
        elif prefix_cache is True and max_cache_tokens is None:  # the blocks its prompts share
            prefix_cache = PrefixCache.for_requests(requests)
        return cls(
            model, max_length, max_requests, rows_per_request=rows_per_request,
            prompt_width=max((len(r.prompt) for r in requests), default=0), max_cache_tokens=max_cache_tokens,
            prefill_chunk=prefill_chunk, step_tokens=step_tokens, prefix_cache=prefix_cache,
        )

    def run(self, group, between_steps=None):
        """Steps in this thread until nothing is left, ``group``'s results delivered after each
        step; its ``DecodeResult``. ``between_steps()`` is called before each step."""
        while self.busy:
            if between_steps is not None:
                between_steps()
            self.step()
            group.deliver()
        if group.error is not None:
            raise group.error
        return group.result()

    # -- groups in and out (any thread) ------------------------------------------------

    def submit(self, requests, sampler, on_finish=None, stream=None, priority=0, tenant=None, max_rows=None):
        """Adds ``requests`` (their ids: 0, 1, ... in order) as a group of their own, choosing with
        ``sampler``; its ``Group``. ``on_finish(i, completion)`` receives request i's result and
        ``stream(i, token)`` its tokens; ``priority`` (lower first) and ``tenant`` weigh it against
        the other groups; ``max_rows``: the most of its requests in flight."""
        rows = sampler.rows_per_prompt(self.model.backbone.token_embedding.embeddings.shape[0])
        search = not sampler.independent_rows
        if search and self.thread is not None:
            raise ValueError(f"{sampler.name!r} search runs in an engine of its own (lmq.core.generation.decode).")
        if rows != self.rows_per_request:
            raise ValueError(f"{sampler.name!r} takes {rows} rows a request; this engine's requests take {self.rows_per_request}.")
        for i, request in enumerate(requests):
            if request.id != i:
                raise ValueError(f"A group's requests are numbered 0, 1, ...: request {i} has id {request.id}.")
            if request.need > self.max_length:
                raise ValueError(
                    f"Prompt {i} needs {request.need} positions (prompt and completion), more than the "
                    f"engine's {self.max_length}."
                )
        with self.condition:
            if self.closed:
                raise EngineClosed("The engine is closed.")
            if search and (self.groups or self.incoming):
                raise ValueError(f"{sampler.name!r} search runs in an engine of its own (lmq.core.generation.decode).")
            if self.sampler.search is not None:
                raise ValueError("This engine runs a search; it takes no other group.")
            renumbered = [dataclasses.replace(r, id=next(self._request_ids)) for r in requests]
            group = Group(self, next(self._group_numbers), sampler, renumbered, on_finish, stream, priority, tenant,
                          max_rows)
            if not requests:
                return group
            if search:
                self.sampler.search = sampler
            self.incoming.append(group)
            self.condition.notify_all()
        return group

    def cancel(self, group):
        """Takes ``group``'s requests out at the start of the next step; what they made is dropped."""
        with self.condition:
            group.cancelled = True
            self.leaving.append(group)
            self.condition.notify_all()

    @property
    def busy(self):
        return bool(self.incoming or self.leaving or self.scheduler.busy or self.batch.size)

    # -- stepping (one thread) -----------------------------------------------------------

    def step(self):
        """One step: groups in and out, requests join, one forward pass, tokens chosen, finished
        requests out."""
        scheduler, batch = self.scheduler, self.batch
        self._take_changes()
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
        self._take_failures()

    def _take_changes(self):
        with self.condition:
            incoming, self.incoming = self.incoming, []
            leaving, self.leaving = self.leaving, []
        for group in incoming:
            if group.cancelled:
                continue
            self.groups[group.number] = group
            self.owner.update((r.id, group) for r in group.requests)
            group.queue = self.scheduler.add(group.requests, group.priority, group.tenant, group.max_rows)
            if group.stream is not None:
                self.batch.stream = self._stream
        for group in leaving:
            self._drop(group)

    def _drop(self, group):
        """Takes a cancelled or failed group out: waiting, prefilling and decoding requests."""
        if self.groups.pop(group.number, None) is None:
            return
        if group.queue is not None:
            self.cache_manager.drop_prefilling(self.scheduler.remove(group.queue))
        self.batch.drop(list(group.local))
        for request in group.local:
            self.scheduler.release(request)
            self.owner.pop(request, None)
        self.scheduler.finished(int(self.batch.rows["end"].max()) if self.batch.size else 0)

    def _take_failures(self):
        """Groups whose own sampler failed this step leave (their rows are dropped now)."""
        for group in [g for g in self.groups.values() if g.error is not None]:
            self._drop(group)

    def _finished(self, request, completion):
        """The batch's ``on_finish``: the result goes to its group, to be delivered."""
        group = self.owner.pop(request, None)
        self.scheduler.release(request)
        if group is None or group.cancelled or group.error is not None:
            return
        group.arrived.append((group.local[request], completion))
        if len(group.completions) + len(group.arrived) == group.size:
            del self.groups[group.number]  # nothing of it is left in flight

    def _stream(self, request, token):
        group = self.owner.get(request)
        if group is not None and group.stream is not None and not group.cancelled:
            group.stream(group.local[request], token)

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

    # -- a thread of its own --------------------------------------------------------------

    def start(self, name="lmq-engine"):
        """Steps the engine in a thread of its own while it has work, until ``close``."""
        self.thread = threading.Thread(target=self._drive, name=name, daemon=True)
        self.thread.start()
        return self

    def close(self):
        """No more groups; the thread ends once those in flight are done."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()

    @torch.inference_mode()
    def _drive(self):
        while True:
            with self.condition:
                while not self.busy and not self.closed:
                    self.condition.wait()
                if not self.busy:
                    return
            try:
                self.step()
            except Exception as error:  # every group in flight fails with it; the engine starts afresh
                self._fail(error)
            with self.condition:
                self.condition.notify_all()

    def _fail(self, error):
        with self.condition:
            failed = list(self.groups.values()) + self.incoming
            self.incoming, self.leaving = [], []
        for group in failed:
            group.error = error
        self.groups.clear()
        self.owner.clear()
        self.last_error = error
        self._reset()

    def shrink(self, error):
        """After ``error`` (out of memory) failed a step: half the rows and cache, once per failure
        however many of its groups ask."""
        with self.condition:
            if error is not self.last_error:
                return
            self.last_error = None
            self.max_rows = max(1, self.max_rows // 2)
            if self.max_cache_tokens is not None:
                self.max_cache_tokens = max(1, self.max_cache_tokens // 2)
            self.cache_manager.max_requests, self.cache_manager.max_cache_tokens = self.max_rows, self.max_cache_tokens


class GroupSampler:
    """The engine's sampler: each group's rows choose with the group's own sampler, which sees
    only them (``GroupRows``), numbered its own way. A search (beam, contrastive) is an engine's
    only group and sees the batch itself."""

    def __init__(self, engine):
        self.engine = weakref.proxy(engine)  # see Engine._reset
        self.search = None  # the engine's search sampler, when it runs one
        self.completed = None

    @property
    def commits_each_step(self):
        return self.search is None or self.search.commits_each_step

    @property
    def reads_prompt_states(self):
        return self.search is not None and self.search.reads_prompt_states

    def admit(self, batch, rows, hidden):
        owners = [self.engine.owner[request] for request in rows["request"].tolist()]
        device = rows["request"].device
        rows["group"] = torch.tensor([g.number for g in owners], device=device)
        rows["local"] = torch.tensor([g.local[r] for g, r in zip(owners, rows["request"].tolist())], device=device)
        if self.search is not None:  # the engine's only group, numbered as the engine numbers it
            self.search.admit(batch, rows, hidden)
            return
        for group, index in self._split(rows["group"]):
            view = GroupRows(batch, rows, index)
            self._guarded(group, lambda: group.sampler.admit(view, view.rows, None))  # a group's sampler keeps no states

    def choose(self, batch, logits):
        if self.search is not None:
            self.completed = None
            return self.search.choose(batch, logits)
        tokens = torch.zeros(len(logits), dtype=torch.long, device=logits.device)
        self.completed = None
        groups = list(self._split(batch.rows["group"]))
        self.engine.shared_steps += len(groups) > 1
        for group, index in groups:
            view = GroupRows(batch, batch.rows, index)
            # One group's rows take the logits as they are: a copy of [rows, vocab] costs a step ~1 ms.
            own = logits if len(groups) == 1 else logits[index]
            chosen = self._guarded(group, lambda: group.sampler.choose(view, own))
            if chosen is None:
                continue
            tokens[index] = chosen
            completed = group.sampler.completed_rows()
            if completed is not None:
                if self.completed is None:
                    self.completed = torch.zeros(len(logits), dtype=torch.bool, device=logits.device)
                self.completed[index] = completed
        return tokens

    def completed_rows(self):
        return self.search.completed_rows() if self.search is not None else self.completed

    def finish(self, rows):
        if self.search is not None:
            return self.search.finish(rows)
        return Completion(rows[0].token_ids, rows[0].finish_reason)

    def _split(self, numbers):
        """(group, its rows' index) for each group with rows here."""
        for number in numbers.unique().tolist():
            group = self.engine.groups.get(number)
            if group is not None:
                yield group, (numbers == number).nonzero()[:, 0]

    @staticmethod
    def _guarded(group, call):
        """``call()``; what it raises fails its group alone (the engine drops it after the step)."""
        if group.error is not None:
            return None
        try:
            return call()
        except Exception as error:
            group.error = error
            return None


class GroupRows:
    """One group's rows of the batch, as its sampler sees them: what ``batch.rows`` holds, read
    for those rows only (on first use), with ``request`` the group's own request numbers."""

    def __init__(self, batch, rows, index):
        self.batch, self.index = batch, index
        self.rows = _RowsOf(rows, index)

    def row_generators(self):
        generators = self.batch.row_generators()
        return None if generators is None else [generators[i] for i in self.index.tolist()]


class _RowsOf(Mapping):
    def __init__(self, rows, index):
        self._rows, self._index, self._read = rows, index, {}

    def __getitem__(self, name):
        if name not in self._read:
            self._read[name] = self._rows["local" if name == "request" else name][self._index]
        return self._read[name]

    def __iter__(self):
        return iter(self._rows)

    def __len__(self):
        return len(self._rows)


def requests_of(prompts, limits, stop_token_ids=(), seeds=None, stop_strings=None, priorities=None, adapters=None):
    """``decode``'s arguments as ``Request`` records, numbered 0, 1, ..."""
    if not any(isinstance(ids, (list, tuple)) for ids in stop_token_ids):
        stop_token_ids = [stop_token_ids] * len(prompts)
    if not isinstance(adapters, (list, tuple)):
        adapters = [adapters] * len(prompts)
    if len(adapters) != len(prompts):
        raise ValueError(f"adapter has {len(adapters)} names for {len(prompts)} prompts; give one per prompt or one.")
    return [
        Request(
            i, list(prompt), limit, seed=None if seeds is None else seeds[i], stop_token_ids=tuple(stop_token_ids[i]),
            stop_strings=None if stop_strings is None else stop_strings[i],
            priority=0 if priorities is None else priorities[i], adapter=adapters[i],
        )
        for i, (prompt, limit) in enumerate(zip(prompts, limits))
    ]


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
    engine=None,
    job_priority=0,
    tenant=None,
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

    ``engine``: a running ``Engine`` (a worker's, for this model) to submit the requests to,
    as a group of ``job_priority`` and ``tenant`` with at most ``max_rows`` requests in flight,
    instead of an engine of their own; this thread waits for them (``Group.wait``).

    ``prefix_cache``: prompt blocks computed once are reused by the requests that share
    them, never across adapters (``Engine._prefix_cache``: True, False, or a ``PrefixCache`` kept across calls); a
    sampler that reads the prompts' hidden states (contrastive search) computes every prompt.
    """
    requests = requests_of(prompts, limits, stop_token_ids, seeds, stop_strings, priorities, adapters)
    if engine is not None:
        if engine.model.backbone is not model.backbone:
            raise ValueError("The engine given runs another model.")
        group = engine.submit(requests, sampler, on_finish, stream, job_priority, tenant, max_rows)
        return group.wait(between_steps)
    engine = Engine.for_requests(
        model, sampler, requests, max_rows=max_rows, max_cache_tokens=max_cache_tokens, prefill_chunk=prefill_chunk,
        step_tokens=step_tokens, prefix_cache=prefix_cache,
    )
    return engine.run(engine.submit(requests, sampler, on_finish, stream), between_steps)
