"""The scheduler: which requests join, and what each step's forward pass runs.

It owns the waiting queue (by priority, then shortest prompt first: neighbours of
similar length waste little) and admits requests while the KV-cache manager has room.
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

from collections import deque
from dataclasses import dataclass, field

PREFILL_CHUNK = 256  # the most prompt tokens of one step (chunked prefill)


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


@dataclass
class StepPlan:
    """One step's work: ``decode_rows`` running rows take a token, then prompt chunks."""

    decode_rows: int
    chunks: list  # (Prefill, start, stop): prompt tokens [start, stop) of that request

    @property
    def tokens(self):
        return self.decode_rows + sum(stop - start for _, start, stop in self.chunks)


class Scheduler:
    def __init__(self, requests, cache_manager, max_rows, prefill_chunk=PREFILL_CHUNK, step_tokens=None):
        """``max_rows``: the most rows in flight (requests x rows per request); ``step_tokens``
        (default: those rows + ``prefill_chunk``) must exceed them. ``prefill_chunk`` None:
        prompts go in whole, for a model that cannot continue one (the oldest whatever its
        length, the others while they fit the step)."""
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}.")
        self.chunked = prefill_chunk is not None
        self.prefill_chunk = prefill_chunk if self.chunked else PREFILL_CHUNK
        self.step_tokens = max_rows + self.prefill_chunk if step_tokens is None else step_tokens
        if self.step_tokens <= max_rows:
            raise ValueError(
                f"step_tokens={self.step_tokens} leaves no prompt tokens beside {max_rows} decoding rows."
            )
        self.waiting = deque(sorted(requests, key=lambda r: (r.priority, len(r.prompt), r.id)))
        self.cache_manager = cache_manager
        self.prefilling = []  # Prefill records, oldest first
        self.longest = 0  # the most positions a request in flight needs
        self.prompt_tokens_computed = 0  # prompt tokens run through the model (not taken from the prefix cache)

    @property
    def busy(self):
        return bool(self.waiting or self.prefilling)

    def admit(self):
        """Takes waiting requests while the cache has room (at least one when nothing runs):
        the requests admitted, their slot groups allocated."""
        admitted, joining, longest = [], [], self.longest
        while self.waiting:
            request = self.waiting[0]
            if request.limit > 0:  # a request with nothing to generate takes no room
                if not self.cache_manager.fits(len(joining) + 1, max(longest, request.need)):
                    break
                joining.append(request)
                longest = max(longest, request.need)
            admitted.append(self.waiting.popleft())
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
