"""The scheduler: which requests join, and what each step's forward pass runs.

It owns the waiting queues and admits requests while the KV-cache manager has room.
Requests come in groups (a job's, see ``Engine.submit``), each with its own queue (by
request priority, then shortest prompt first: neighbours of similar length waste little).
Which queue the next request comes from is stride scheduling: a group's *pass* grows by
``1 / weight`` for each request it admits (weight ``2 ** -priority``: a group of priority
-1 admits twice as often as one of 0), and the waiting group of the lowest pass goes
next. So every waiting group is admitted in its turn, whatever the others hold: a huge
job never starves a small one, and a group that starts late starts at the others' pass
(it gets no burst for the time it was not there). A group may cap its own requests in
flight (``limit``), and while another tenant waits, a tenant holds at most
``tenant_rows`` requests in flight (``LMQ_TENANT_ROW_SHARE`` of the engine's).
Each step has a budget of ``step_tokens`` tokens, shared: every decoding row takes one
(its newest token), and what is left goes to prompt chunks of the requests being
prefilled, oldest first, at most ``prefill_chunk`` prompt tokens a step. So a long prompt
goes in over several steps while the others keep decoding, and since the budget always
leaves prompt tokens (it must exceed the rows in flight), the oldest prefilling request
moves on every step: no admitted request waits forever.

With a prefix cache (the cache manager's ``prefix_cache``), a prefilling request about to
take a chunk at a block boundary first takes the cached blocks that follow (its prefill
then starts after them, at no cost to the step's budget; the last prompt token is always
computed, for its logits), and the full prompt blocks a chunk completes go into the cache.
A request whose next block an earlier chunk of the same step computes sits that step out
and takes the block from the cache at the next (the oldest request is never held back).
"""

import itertools
from collections import deque
from dataclasses import dataclass, field

# The most prompt tokens of one step (chunked prefill). vLLM's CPU build takes 4096 a step for
# offline batches; here 512 ran workload c 1.07x and b 1.05x as fast as 256 (docs/peer-bench.md),
# and 4096 no faster than 256, with more memory for the step's activations.
PREFILL_CHUNK = 512


@dataclass
class Prefill:
    """A request being prefilled: its prompt is in the cache up to ``done``."""

    request: object  # a Request
    done: int = 0
    hidden: list = field(default_factory=list)  # (start, hidden states) of each chunk computed
    digests: list | None = None  # its prompt blocks' hash chain, once looked up in the prefix cache
    cached: int = 0  # its leading prompt blocks the prefix cache holds (taken from it, or saved)

    @property
    def ready(self):
        return self.done == len(self.request.prompt)


@dataclass(eq=False)
class Queue:
    """A group's waiting requests and what fair admission counts of it."""

    priority: int = 0  # lower is admitted more often (weight 2 ** -priority)
    tenant: str | None = None
    limit: int | None = None  # the most of its requests in flight (None: the engine's budget)
    waiting: deque = field(default_factory=deque)
    in_flight: int = 0
    pass_: float = 0.0  # stride scheduling's virtual time: admitted requests / weight
    order: int = 0  # arrival, to break ties

    @property
    def stride(self):
        return 2.0 ** self.priority

    @property
    def at_limit(self):
        return self.limit is not None and self.in_flight >= self.limit


@dataclass
class StepPlan:
    """One step's work: ``decode_rows`` running rows take a token, then prompt chunks."""

    decode_rows: int
    chunks: list  # (Prefill, start, stop): prompt tokens [start, stop) of that request

    @property
    def tokens(self):
        return self.decode_rows + sum(stop - start for _, start, stop in self.chunks)


class Scheduler:
    def __init__(self, requests, cache_manager, max_rows, prefill_chunk=PREFILL_CHUNK, step_tokens=None,
                 tenant_rows=None):
        """``requests``: a first group's (more come with ``add``); ``max_rows``: the most rows in
        flight (requests x rows per request); ``step_tokens`` (default: those rows +
        ``prefill_chunk``) must exceed them. ``prefill_chunk`` None: prompts go in whole, for a
        model that cannot continue one (the oldest whatever its length, the others while they
        fit the step). ``tenant_rows``: the most requests one tenant holds in flight while
        another tenant's wait (None: no bound)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}.")
        self.chunked = prefill_chunk is not None
        self.prefill_chunk = prefill_chunk if self.chunked else PREFILL_CHUNK
        self.step_tokens = max_rows + self.prefill_chunk if step_tokens is None else step_tokens
        if self.step_tokens <= max_rows:
            raise ValueError(
                f"step_tokens={self.step_tokens} leaves no prompt tokens beside {max_rows} decoding rows."
            )
        self.tenant_rows = tenant_rows
        self.queues = []  # the groups' Queues, in arrival order
        self.owner = {}  # request id in flight -> its Queue
        self._arrivals = itertools.count()
        self.clock = 0.0  # the pass of the group admitted last
        self.cache_manager = cache_manager
        self.prefilling = []  # Prefill records, oldest first
        self.longest = 0  # the most positions a request in flight needs
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (not taken from the prefix cache)
        if requests:
            self.add(requests)

    @property
    def busy(self):
        return bool(self.prefilling or any(queue.waiting for queue in self.queues))

    def add(self, requests, priority=0, tenant=None, limit=None):
        """A group of requests to admit, fairly among the others; its ``Queue``."""
        start = min((q.pass_ for q in self.queues if q.waiting), default=self.clock)
        queue = Queue(priority, tenant, limit, order=next(self._arrivals), pass_=start)
        queue.waiting.extend(sorted(requests, key=lambda r: (r.priority, len(r.prompt), r.id)))
        self.queues.append(queue)
        return queue

    def remove(self, queue):
        """Drops ``queue``'s group: its waiting requests, and its prefilling ones, whose ids are
        returned (their slots are the caller's to free)."""
        gone = [p.request.id for p in self.prefilling if self.owner.get(p.request.id) is queue]
        self.prefilling = [p for p in self.prefilling if self.owner.get(p.request.id) is not queue]
        for request in gone:
            self.release(request)
        queue.waiting.clear()
        self._forget_idle()
        return gone

    def release(self, request):
        """Request ``request`` (an id) left the engine: its group holds one fewer in flight."""
        queue = self.owner.pop(request, None)
        if queue is not None:
            queue.in_flight -= 1

    def _forget_idle(self):
        self.queues = [q for q in self.queues if q.waiting or q.in_flight]

    def _next_queue(self):
        """The waiting group whose turn it is, or None while every waiting group is held back
        (at its own limit, or its tenant at its share while another tenant waits)."""
        waiting = [q for q in self.queues if q.waiting and not q.at_limit]
        if self.tenant_rows is not None and len({q.tenant for q in waiting}) > 1:
            held = {}
            for queue in self.queues:
                held[queue.tenant] = held.get(queue.tenant, 0) + queue.in_flight
            waiting = [q for q in waiting if held[q.tenant] < self.tenant_rows]
        return min(waiting, key=lambda q: (q.pass_, q.order), default=None)

    def admit(self):
        """Takes waiting requests while the cache has room (at least one when nothing runs),
        each from the group whose turn it is: the requests admitted, their slot groups allocated."""
        admitted, joining, longest = [], [], self.longest
        while (queue := self._next_queue()) is not None:
            request = queue.waiting[0]
            if request.limit > 0:  # a request with nothing to generate takes no room
                if not self.cache_manager.fits(len(joining) + 1, max(longest, request.need)):
                    break
                joining.append(request)
                longest = max(longest, request.need)
                self.owner[request.id] = queue
                queue.in_flight += 1
                self.clock = queue.pass_
                queue.pass_ += queue.stride
            admitted.append(queue.waiting.popleft())
        self._forget_idle()
        if joining:
            self.cache_manager.allocate([r.id for r in joining], longest)
            self.prefilling += [Prefill(r) for r in joining]
            self.longest = longest
        return admitted

    def schedule(self, decode_rows):
        """This step's plan: ``decode_rows`` rows decoding, then prompt chunks within the budget."""
        budget = min(self.step_tokens - decode_rows, self.prefill_chunk)
        chunks, computing = [], set()  # computing: digests of the prompt blocks this step completes
        for prefill in self.prefilling:
            if budget <= 0:
                break
            if self.cache_manager.prefix_cache is not None:
                self._take_cached_blocks(prefill)
                if self._next_block(prefill) in computing:
                    continue  # an earlier chunk of this step computes it: take it from the cache next step
            stop = min(len(prefill.request.prompt), prefill.done + budget)
            if not self.chunked and stop < len(prefill.request.prompt):
                if chunks:
                    break
                stop = len(prefill.request.prompt)
            chunks.append((prefill, prefill.done, stop))
            budget -= stop - prefill.done
            if prefill.digests is not None:
                size = self.cache_manager.prefix_cache.block_size
                computing.update(prefill.digests[prefill.done // size : stop // size])
        return StepPlan(decode_rows, chunks)

    def _next_block(self, prefill):
        """The digest of the prompt block ``prefill`` computes next, when it starts one it could
        take from the cache (not the block of its last token); else None."""
        size = self.cache_manager.prefix_cache.block_size
        block, within = divmod(prefill.done, size)
        return prefill.digests[block] if not within and block < (len(prefill.request.prompt) - 1) // size else None

    def _take_cached_blocks(self, prefill):
        """Skips ``prefill`` past the cached blocks at its position, copied into its slot."""
        prefix_cache = self.cache_manager.prefix_cache
        size, prompt = prefix_cache.block_size, prefill.request.prompt
        if prefill.digests is None:
            prefill.digests = prefix_cache.digests(prompt, prefill.request.adapter)
        if prefill.done % size:
            return
        first = prefill.done // size
        most = (len(prompt) - 1) // size - first  # the last prompt token is computed, for its logits
        if most > 0:
            found = self.cache_manager.load_prefix(prefill.request.id, prefill.digests, first, most)
            prefill.done += found * size
            prefill.cached = max(prefill.cached, first + found)

    def _save_blocks(self, prefill):
        """Puts the full prompt blocks ``prefill`` has completed into the prefix cache."""
        full = prefill.done // self.cache_manager.prefix_cache.block_size
        if full > prefill.cached:
            self.cache_manager.save_prefix(prefill.request.id, prefill.digests, prefill.cached, full)
            prefill.cached = full

    def prefilled(self, plan, hidden):
        """Records the plan's chunks as done, ``hidden`` [chunk tokens, hidden] their hidden
        states in order (and the full prompt blocks they complete in the prefix cache);
        returns the requests whose prompts are now in, oldest first."""
        offset = 0
        for prefill, start, stop in plan.chunks:
            prefill.hidden.append((start, hidden[offset : offset + stop - start]))
            prefill.done = stop
            offset += stop - start
            self.prompt_tokens_computed += stop - start
            if prefill.digests is not None:
                self._save_blocks(prefill)
        ready = [p for p in self.prefilling if p.ready]
        self.prefilling = [p for p in self.prefilling if not p.ready]
        return ready

    def finished(self, longest_decoding):
        """Requests left: the most positions one in flight needs is now ``longest_decoding``
        or a prefilling request's."""
        self.longest = max([p.request.need for p in self.prefilling] + [longest_decoding])
