"""Prefix caching: the KV of prompt blocks that a running or recent request already computed.

A prompt is cut into blocks of ``block_size`` tokens, and each full block is named by a
hash chain, as in vLLM's automatic prefix caching: a block's digest covers its tokens and
the digest of the block before it, and the first block's covers the request's adapter,
so two prompts share a block's digest only when they share every token up to its end
and their adapter (different adapters never share KV). Prompt blocks a request computed
are copied out of its cache row into this pool (``save``); a request that joins with
the same leading blocks gets them copied into its row (``load``) and its prefill starts
after them. The pool holds at most ``max_tokens`` positions; when full, the least
recently used blocks make room (the last blocks of a chain before its first ones, so a
chain is cut from its tail and what is left still matches).

The engine's cache keeps row slots (``lmq.core.layers.cache``), so a hit is a copy of
the cached blocks into the joining request's slot: its prefill attends over its own slot.
Once such a request decodes, its slot's copy of a long chain of blocks that lie in order in
the pool is given back, and its decode steps read those keys from the pool (``pooled``),
together with every other row that joined on the same chain: a shared instruction is held
once, however many rows read it. The pool does not evict a block such a row reads (``pin``).
"""

import hashlib
from array import array
from collections import Counter, OrderedDict

import torch

BLOCK_SIZE = 16  # prompt tokens per cached block (vLLM's default)
BUDGET_SHARE = 4  # an engine's own prefix cache holds a quarter of its KV budget


class PrefixCache:
    """A pool of cached prompt blocks, by digest, least recently used first.

    One pool may serve several engines of one model in turn (a long-lived engine keeps one
    for good); ``hit_rate`` and ``blocks`` are its metrics. Blocks are keyed by adapter
    name: a pool kept across calls must be ``clear``ed when a name it has seen is loaded
    with other weights.
    """

    def __init__(self, max_tokens, block_size=BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}.")
        self.block_size = block_size
        self.capacity = max_tokens // block_size  # blocks
        self.max_tokens = self.capacity * block_size
        self.storage = None  # {name: tensor}: laid out as a cache slot of capacity x block_size positions, at first save
        self.variant = None  # what the stored keys were computed under (``KVCache.prefix_variant``)
        self.blocks = OrderedDict()  # digest -> storage block, least recently used first
        self.free = list(range(self.capacity - 1, -1, -1))
        self.pins = Counter()  # storage block -> how many rows in flight read it from here
        self.queried_tokens = self.hit_tokens = 0  # prompt tokens looked up, and found

    @classmethod
    def within(cls, max_cache_tokens):
        """The prefix cache of a decode call whose KV budget is ``max_cache_tokens`` positions."""
        return cls(max_cache_tokens // BUDGET_SHARE)

    @property
    def hit_rate(self):
        """The share of the prompt tokens looked up that came from the cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    @classmethod
    def for_requests(cls, requests, block_size=BLOCK_SIZE):
        """The pool of one job's engine, which ends with it: room for every block that two or more
        of its prompts share, and for one prompt's blocks besides (saved before they are known
        unshared, and evicted first, since every hit renews the shared ones); empty when the
        prompts share no block. Sized by the whole job, a pool of blocks no other prompt reads
        would cost as much memory as the prompts' KV."""
        seen, shared = set(), set()
        for request in requests:
            for digest in chain_digests(request.prompt, request.adapter, block_size):
                (shared if digest in seen else seen).add(digest)
        if not shared:
            return cls(0, block_size)
        most = max(len(request.prompt) for request in requests) // block_size
        return cls((len(shared) + most) * block_size, block_size)

    def digests(self, prompt, adapter=None):
        """The hash chain of a joining request's full prompt blocks (``chain_digests``). Counts
        the prompt as looked up."""
        self.queried_tokens += len(prompt)
        return chain_digests(prompt, adapter, self.block_size)

    def load(self, cache, row, digests, first, most):
        """Copies the cached blocks ``digests[first:]`` (up to the first miss, at most ``most``
        blocks) into cache row ``row`` from block ``first``; returns the storage blocks it copied."""
        if self.variant != cache.prefix_variant:
            return []
        found = []
        for digest in digests[first : first + most]:
            if digest not in self.blocks:
                break
            found.append(self.blocks[digest])
        if found:
            self._touch(digests[: first + len(found)])
            positions = self.positions(found)
            held = {name: _positions(tensor, cache.prefix_tensors()[name][1] - 1, found, positions)
                    for name, tensor in self.storage.items()}
            cache.write_positions(row, first * self.block_size, held)
            self.hit_tokens += len(found) * self.block_size
        return found

    def positions(self, blocks):
        """The storage positions of ``blocks`` (storage block indices), in order."""
        return (torch.tensor(blocks, device=self.device)[:, None] * self.block_size
                + torch.arange(self.block_size, device=self.device)).flatten()

    def pin(self, blocks):
        """Rows in flight read ``blocks`` from here: they stay until ``unpin``."""
        self.pins.update(blocks)

    def unpin(self, blocks):
        self.pins.subtract(blocks)
        self.pins += Counter()  # drops the blocks no row reads

    def save(self, cache, row, digests, first, last):
        """Copies blocks ``[first, last)`` of cache row ``row`` (``digests`` its prompt's chain)
        into the pool, evicting the least recently used blocks for room; a block the pool
        holds already is only marked used."""
        last = min(last, first + self.capacity)
        if first >= last:
            return
        if self.variant != cache.prefix_variant:  # the stored keys no longer fit (Phi-3 went long): drop them
            self.clear()
            self.variant = cache.prefix_variant
        if self.storage is None:
            self.storage = cache.new_pool(self.capacity * self.block_size)
        fresh, where = [], []
        for block in range(first, last):
            if digests[block] not in self.blocks:
                if not self.free and not self._evict():
                    break  # every block is read by a row in flight
                self.blocks[digests[block]] = self.free.pop()
                fresh.append(block)
                where.append(self.blocks[digests[block]])
        self._touch(digests[:last])
        if fresh:
            held = cache.read_positions(row, self.positions(fresh))
            index = self.positions(where)
            for name, tensor in self.storage.items():
                tensor.index_copy_(cache.prefix_tensors()[name][1] - 1, index, held[name])

    def _evict(self):
        """Frees the least recently used block that no row in flight reads; False when there is none."""
        for digest, block in self.blocks.items():
            if not self.pins[block]:
                del self.blocks[digest]
                self.free.append(block)
                return True
        return False

    def _touch(self, digests):
        """Marks a chain's blocks used, its first block last: eviction cuts chains from the tail."""
        for digest in reversed(digests):
            if digest in self.blocks:
                self.blocks.move_to_end(digest)

    @property
    def device(self):
        return next(iter(self.storage.values())).device

    def clear(self):
        self.free = list(range(self.capacity - 1, -1, -1))
        self.blocks.clear()
        self.pins.clear()


def in_order(blocks):
    """Whether storage blocks ``blocks`` follow each other, as a chain saved at once does (the pool
    hands out free blocks in order): then their positions are one run of the storage."""
    return blocks == list(range(blocks[0], blocks[0] + len(blocks)))


def _positions(storage, dim, blocks, positions):
    """The positions ``positions`` of storage blocks ``blocks`` (along ``dim``) of ``storage``: a
    view where the blocks are ``in_order``, else a copy."""
    if in_order(blocks):
        return storage.narrow(dim, int(positions[0]), len(positions))
    return storage.index_select(dim, positions)


def chain_digests(prompt, adapter, block_size):
    """One digest per full block of ``prompt``, each covering every token up to its block's end
    and ``adapter``: two prompts share a digest only when they share all of that."""
    chain = hashlib.sha256(repr(("lmq-prefix", adapter)).encode()).digest()
    digests = []
    for start in range(0, len(prompt) - block_size + 1, block_size):
        block = array("q", prompt[start : start + block_size]).tobytes()
        chain = hashlib.sha256(chain + block).digest()
        digests.append(chain)
    return digests
