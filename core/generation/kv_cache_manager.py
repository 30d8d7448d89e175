"""The KV-cache manager: which cache row slots each request in flight holds.

The cache (``lmq.core.layers.cache``) has a fixed number of row slots. A request takes
a slot group of ``rows_per_request`` neighbouring slots (one, or one per beam or
contrastive candidate). The decoding requests, in the running batch's order, hold
groups ``[0, decoding)`` - so a decode step reads a slice of the cache, not a copy - and
the requests being prefilled the groups right after. When requests leave or finish
their prefill, a few groups move (one request's rows each) to keep that order; nothing
else is copied. A cache that is too small for a joining request is replaced by a larger
one that takes the rows in flight. The groups past those in flight give their pages back
(``KVCache.release_rows``). With a ``PrefixCache``, a joining request's leading
prompt blocks are copied into its slot from there when cached (``load_prefix``), and the
blocks it computes are copied out for the requests after it (``save_prefix``). A request
that took a long run of leading blocks lying in order in the pool reads them from there once
it decodes (``pooled_rows``): its slot's copy goes back, and moves skip those positions.
"""

from dataclasses import dataclass, field

import torch

from lmq.core.generation.prefix_cache import in_order


# Groups left give their pages back together once they are an eighth of the cache's: a release
# costs about 30 us a layer on a CPU (the operating system takes the pages off every core), and
# one per finished request took 1% of workload c's time (bench/peer.py). A new request reuses a
# left group's pages as they are.
RELEASE_EVERY = 8


@dataclass(frozen=True)
class Pooled:
    """A request's leading prompt positions that its decode steps read from the prefix cache's
    pool: ``length`` of them, from pool position ``start`` (storage ``blocks``, pinned there). Two
    are equal when they read the same positions (a decode step compares neighbouring rows')."""

    start: int
    length: int
    blocks: tuple = field(compare=False)  # the run of storage blocks that start and length name


class KVCacheManager:
    """Allocates, frees and moves the slot groups of the requests in flight."""

    def __init__(self, model, rows_per_request, max_length, prompt_width, max_requests=None, max_cache_tokens=None,
                 prefix_cache=None):
        """``max_length``/``prompt_width``: the most positions and prompt tokens any request
        of the job needs; ``max_requests`` requests and ``max_cache_tokens`` positions are
        the most the cache is sized for (by default: as the first requests need);
        ``prefix_cache``: a ``PrefixCache``, or None (no prefix caching)."""
        self.model = model
        self.prefix_cache = prefix_cache
        self.rows_per_request = rows_per_request
        self.max_length, self.prompt_width = max_length, prompt_width
        self.max_requests, self.max_cache_tokens = max_requests, max_cache_tokens
        self.cache = None
        self.groups = self.length = 0  # what the cache holds: slot groups, positions per slot
        self.decoding = 0  # requests decoding: groups [0, decoding)
        self.decoding_requests = []  # their ids, group by group
        self.prefilling = {}  # request id -> slot group, in the order the requests were admitted
        self.pooled = {}  # request id in flight -> its ``Pooled`` prompt positions
        self.held = 0  # groups [0, held) may hold keys: those in flight, and those left since the last release

    @property
    def in_flight(self):
        return self.decoding + len(self.prefilling)

    def fits(self, more, longest):
        """Whether ``more`` requests can join, the longest of all then needing ``longest`` positions."""
        requests = self.in_flight + more
        if requests == 1:
            return True
        if self.max_requests is not None and requests > self.max_requests:
            return False
        return self.max_cache_tokens is None or requests * self.rows_per_request * longest <= self.max_cache_tokens

    def allocate(self, requests, longest):
        """Slot groups for ``requests`` (ids), the cache grown to ``longest`` positions if need be."""
        self._reserve(self.in_flight + len(requests), longest)
        for request in requests:
            self.prefilling[request] = self.in_flight
        self.held = max(self.held, self.in_flight)

    def _reserve(self, groups, length):
        """A cache with room for ``groups`` requests of ``length`` positions, the rows in flight kept.

        A new cache is as long as the requests in flight need (grown by half again when
        outgrown, so a long-tailed job reallocates a few times) and has as many slot groups
        as the budget holds at that length.
        """
        if self.cache is not None and groups <= self.groups and length <= self.length:
            return
        if self.cache is not None and length > self.length:
            length = max(length, self.length * 3 // 2)
        length = min(max(length, self.length), self.max_length)
        most = self.max_requests or groups
        if self.max_cache_tokens is not None:
            most = min(most, self.max_cache_tokens // (self.rows_per_request * length))
        size = max(groups, most, self.groups if length == self.length else 0)
        cache = self.model.new_cache(size * self.rows_per_request, length, self.prompt_width)
        if self.cache is not None:
            cache.take(self.cache, self.in_flight * self.rows_per_request)
        self.cache, self.groups, self.length = cache, size, length
        self.held = self.in_flight
        for group, request in enumerate(self.decoding_requests):  # ``take`` wrote their pooled positions
            if request in self.pooled:
                self.cache.release_positions(group, self.pooled[request].length)

    def first_slot(self, request):
        """The cache slot a prefilling request's prompt goes into (its group's first)."""
        return self.prefilling[request] * self.rows_per_request

    def load_prefix(self, request, digests, first, most):
        """Copies the cached blocks ``digests[first:]`` (at most ``most``, up to the first miss)
        into a prefilling request's slot; returns how many blocks it copied. A long run of
        leading blocks that lie in order in the pool is kept there for the request's decode
        steps to read (``Pooled``)."""
        found = self.prefix_cache.load(self.cache, self.first_slot(request), digests, first, most)
        length = len(found) * self.prefix_cache.block_size
        if first == 0 and found and self._poolable(found, length):
            self.prefix_cache.pin(found)
            self.pooled[request] = Pooled(found[0] * self.prefix_cache.block_size, length, tuple(found))
        return len(found)

    def _poolable(self, blocks, length):
        """Whether decode steps may read ``blocks`` (``length`` positions) from the pool: one run of
        it, keys that depend on the tokens alone, a request of one row, and a model whose rows
        read their leading keys once (``reads_shared_keys_once``)."""
        return (self.rows_per_request == 1 and self.cache.prefix_variant is None and in_order(blocks)
                and self.model.backbone.reads_shared_keys_once(self.cache, length))

    def save_prefix(self, request, digests, first, last):
        """Copies a prefilling request's prompt blocks ``[first, last)`` into the prefix cache."""
        self.prefix_cache.save(self.cache, self.first_slot(request), digests, first, last)

    def start_decoding(self, requests):
        """``requests`` (prefilled) decode from now on, after the decoding ones: their groups
        move into place, and a request of several rows gets its prompt in each of them. A
        pooled request's slot gives back its copy of the positions it reads from the pool."""
        group = self.rows_per_request
        if group > 1:
            first = torch.tensor([self.first_slot(r) for r in requests], device=self.model.device)
            within = torch.arange(1, group, device=first.device)
            self.cache.move_rows(first.repeat_interleave(group - 1), (first[:, None] + within).flatten())
        for request in requests:
            if request in self.pooled:
                self.cache.release_positions(self.first_slot(request), self.pooled[request].length)
        order = list(range(self.decoding)) + [self.prefilling.pop(r) for r in requests]
        self.decoding_requests += requests
        self._pack(order)

    def pooled_rows(self):
        """Each decoding row's ``Pooled`` positions (or None), in row order; None when no row has any."""
        if not self.pooled:
            return None
        rows = [self.pooled.get(request) for request in self.decoding_requests]
        return rows if any(rows) else None

    def _forget(self, request):
        """``request`` leaves: the pool blocks it read are free to go."""
        pooled = self.pooled.pop(request, None)
        if pooled is not None:
            self.prefix_cache.unpin(pooled.blocks)

    def drop_prefilling(self, requests):
        """Prefilling ``requests`` (ids) leave before they decode (a cancelled job's): the
        prefilling requests after them move up, so the groups stay packed."""
        for request in requests:
            del self.prefilling[request]
            self._forget(request)
        self._pack(list(range(self.decoding)))

    def leave(self, finished, ends=None):
        """The decoding requests of groups ``finished`` leave: the last decoding requests move
        into their groups, each copying its keys no further than its end (``ends``: each decoding
        group's, by its old group; None: as far as any slot was written). Returns the new order:
        ``order[i]`` is the old group of group i."""
        gone = set(finished)
        kept = self.decoding - len(gone)
        movers = iter([g for g in range(kept, self.decoding) if g not in gone])
        order = [g if g not in gone else next(movers) for g in range(kept)]
        for group in gone:
            self._forget(self.decoding_requests[group])
        self.decoding_requests = [self.decoding_requests[g] for g in order]
        self._pack(order, ends)
        return order

    def _pack(self, order, ends=None):
        """Moves slot groups so that the decoding requests, whose groups are ``order`` in their
        new order, hold groups ``[0, len(order))`` and the prefilling ones the next. A decoding
        request's positions read from the pool are not moved: its slot holds none; with ``ends``
        (by old group), nor are its positions past its end."""
        source, target, skipped, stops = [], [], [], []
        for to, of in enumerate(order):
            if of != to:
                source.append(of)
                target.append(to)
                pooled = self.pooled.get(self.decoding_requests[to])
                skipped.append(0 if pooled is None else pooled.length)
                stops.append(None if ends is None else ends[of])
        first, last = len(order), len(order) + len(self.prefilling)
        free = iter(sorted(set(range(first, last)) - set(self.prefilling.values())))
        for request, group in self.prefilling.items():
            if not first <= group < last:
                source.append(group)
                self.prefilling[request] = next(free)
                target.append(self.prefilling[request])
                skipped.append(0)
                stops.append(None)
        if source:
            starts = self._per_slot(skipped) if any(skipped) else None
            stops = self._per_slot(stops) if any(stop is not None for stop in stops) else None
            self.cache.move_rows(self.slots(source), self.slots(target), starts, stops)
            for group, start in zip(target, skipped):  # what the slot's last request left there goes back
                if start:
                    self.cache.release_positions(group, start)
        self.decoding = len(order)
        if self.held - self.in_flight >= max(1, self.groups // RELEASE_EVERY):  # the groups left: their pages go back
            self.cache.release_rows(self.in_flight * self.rows_per_request, self.held * self.rows_per_request)
            self.held = self.in_flight

    def _per_slot(self, values):
        """One value per slot group -> one per slot (each repeated for the group's rows)."""
        return [value for value in values for _ in range(self.rows_per_request)]

    def slots(self, groups):
        """The cache slots of slot groups ``groups``, group by group."""
        groups = torch.tensor(groups, dtype=torch.long, device=self.model.device)
        within = torch.arange(self.rows_per_request, device=groups.device)
        return (groups[:, None] * self.rows_per_request + within).flatten()

    def select_rows(self, index):
        """Decoding rows ``[0, len(index))`` take the cache rows ``index`` (beams reordered)."""
        self.cache.select_rows(index)
