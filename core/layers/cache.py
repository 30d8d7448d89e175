"""The KV cache: a fixed number of row slots, each ``max_length`` positions, written in place.

A continuously refilled batch keeps one cache for a whole job: a request's row owns
a slot while it is decoded, the rows in flight occupy slots ``[0, rows)`` (a decode
step over them reads a slice, not a copy), and when a row finishes the decode engine
moves the last row into its slot (``move_rows``, one row's copy) instead of copying
the whole cache. Joining prompts are prefilled straight into free slots, in chunks
when long (a prefill may start at any position). ``take`` fills a larger cache
from a smaller one, for a batch whose requests outgrow it.

A decoder-only model writes a generation step's tokens flattened (``place``, then
``write`` in every layer: one scatter for every request's tokens) and reads each part
of the step from ``key_positions``; an encoder-decoder's decoder writes padded rows
(``update``, ``step``).
"""

import ctypes
import mmap
import os

import torch

from lmq.core import kernels
from lmq.core.layers.projection import cpu_float32_inference


def zeroed(shape, dtype, device):
    """A tensor of zeros; on a CPU, memory mapped from the operating system in small pages,
    each resident only once written (torch's zeros are written everywhere) and returned
    to the system when the tensor goes."""
    size = torch.Size(shape).numel() * dtype.itemsize
    if torch.device(device).type != "cpu" or size == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pages.madvise(mmap.MADV_NOHUGEPAGE)  # a huge page would be 2 MiB resident for a row's few kilobytes
    return torch.frombuffer(pages, dtype=torch.uint8, count=size).view(dtype).view(shape)


def _libc_madvise():
    """The C library's madvise(address, length, advice), or None where there is none to call."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


_MADVISE = _libc_madvise() if hasattr(mmap, "MADV_DONTNEED") else None


def release(view):
    """Zeros ``view`` (a contiguous part of a ``zeroed`` CPU tensor), giving the pages wholly inside
    it back to the operating system: they are resident again only once written."""
    data = view.reshape(-1).view(torch.uint8)
    start = view.data_ptr()
    first = min(-(-start // mmap.PAGESIZE) * mmap.PAGESIZE - start, len(data))  # offsets of the whole pages
    last = max((start + len(data)) // mmap.PAGESIZE * mmap.PAGESIZE - start, first)
    if _MADVISE is None or last == first:
        data.zero_()
        return
    data[:first].zero_()  # the parts of pages that other slots share
    data[last:].zero_()
    if _MADVISE(start + first, last - first, mmap.MADV_DONTNEED) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"madvise: {os.strerror(error)}")


class KVCache:
    """Keys and values of every layer: [layers, slots, kv_heads, max_length, head_dim].

    On a CPU the cache's pages are the operating system's zero pages until written
    (``zeroed``), so its memory grows with the positions the rows use, not the slots it
    has; moving rows copies only the positions written so far (``extent``).
    """

    def __init__(self, num_layers, batch_size, num_heads, max_length, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = zeroed(shape, dtype, device)
        self.values = zeroed(shape, dtype, device)
        self._rows = torch.arange(batch_size, device=device)
        self.extent = 0  # no slot holds anything at position ``extent`` or later

    def row_tensors(self):
        """{name: (row dimension, position dimension or None)} of every tensor kept per slot:
        ``move_rows``, ``select_rows`` and ``take`` move them all together."""
        return {"keys": (1, 3), "values": (1, 3)}

    @property
    def max_length(self):
        return self.keys.shape[3]

    def update(self, layer, keys, values, context):
        """Writes this pass's keys/values [rows, heads, seq, dim]; returns what to attend to.

        A prefill (``context.write_positions`` None) writes positions ``[start, key_length)``
        of ``context.cache_rows`` (every slot when None), where ``key_length`` is the
        prefix a chunk continues (None: the chunk is the prompt's start). A decode step
        writes one token per row, rows ``[0, rows)``, each at its own position.
        """
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        if context.write_positions is None:
            length = keys.shape[2]
            end = context.key_length or length
            rows = slice(None) if context.cache_rows is None else context.cache_rows
            layer_keys[rows, :, end - length : end] = keys
            layer_values[rows, :, end - length : end] = values
            self.extent = max(self.extent, end)
            if end == length:
                return keys, values
            return layer_keys[rows, :, :end], layer_values[rows, :, :end]
        rows = len(keys)
        self.extent = max(self.extent, context.key_length)
        layer_keys[self._rows[:rows], :, context.write_positions] = keys[:, :, 0]
        layer_values[self._rows[:rows], :, context.write_positions] = values[:, :, 0]
        return layer_keys[:rows, :, : context.key_length], layer_values[:rows, :, : context.key_length]

    def place(self, token_rows, positions, end):
        """Where a flattened step's tokens (rows and positions [tokens], each below ``end``) go
        in their rows: their slots [tokens]."""
        self.extent = max(self.extent, end)
        return positions

    def key_positions(self, first_row, rows, key_length):
        """What ``rows`` rows from ``first_row`` read to see keys up to ``key_length``: how many
        slots, and the position each holds ([rows or 1, slots])."""
        return key_length, torch.arange(key_length, device=self.keys.device)[None]

    def write(self, layer, keys, values, context):
        """A flattened step's keys/values [heads, tokens, dim] into rows ``context.token_rows``
        at slots ``context.write_positions``; returns the layer's keys and values [slots, heads, length, dim]."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        kernel = kernels.write_kv() if cpu_float32_inference(layer_keys) and keys.dtype == torch.float32 else None
        if kernel is not None:  # one call for both, where indexed assignment costs about 30 us each
            kernel(layer_keys, layer_values, keys, values, context.token_rows, context.write_positions)
            return layer_keys, layer_values
        layer_keys[context.token_rows, :, context.write_positions] = keys.transpose(0, 1)
        layer_values[context.token_rows, :, context.write_positions] = values.transpose(0, 1)
        return layer_keys, layer_values

    def move_rows(self, source, target, starts=None, stops=None):
        """Copies slots ``source`` into slots ``target`` (index tensors; every source is read
        before any target is written, so rows may trade places). ``starts`` (a list, or None):
        each source's first position to copy, where the positions before it are read from
        elsewhere (a prefix cache's pool) and its slot holds none. ``stops`` (a list, or None):
        each source's end, past which its row holds no key: its keys and values are copied no
        further, so a target's pages that its row never reaches stay unwritten (a target's
        positions past the row's end are never read). Rows that trade places, and a GPU's, copy
        whole slots."""
        pairs = None
        if source.device.type == "cpu":
            sources, targets = source.tolist(), target.tolist()
            if not set(sources) & set(targets):  # no slot is both: row by row, no copy between
                pairs = list(zip(sources, targets, starts or [0] * len(sources), stops or [None] * len(sources)))
        keyed = self.prefix_tensors()  # keys and values: what is read no further than a row's end
        for name, (dim, position_dim) in self.row_tensors().items():
            tensor = getattr(self, name)
            if position_dim is not None:  # the positions written so far: past them every slot is as it began
                tensor = tensor.narrow(position_dim, 0, min(self.extent, tensor.shape[position_dim]))
            if pairs is not None:  # 4x indexing's speed here
                for row, to, start, stop in pairs:
                    held, into = tensor.select(dim, row), tensor.select(dim, to)
                    if position_dim is not None:
                        end = held.shape[position_dim - 1]
                        if stop is not None and name in keyed:
                            end = min(stop, end)
                        count = max(end - start, 0)
                        held, into = held.narrow(position_dim - 1, start, count), into.narrow(position_dim - 1, start, count)
                    into.copy_(held)
            else:
                rows = (slice(None),) * dim
                tensor[rows + (target,)] = tensor[rows + (source,)]  # a copy first: 5x index_select's speed here

    def release_rows(self, first, last):
        """Slots ``[first, last)`` hold nothing any more: on a CPU their keys and values are zeroed
        as a slot never written is, and their pages go back to the operating system, where a
        finished or moved row's old slot would otherwise stay resident until the cache goes."""
        if self.keys.device.type != "cpu" or first >= last:
            return
        for tensor in (self.keys, self.values):  # zeroed: [layers, slots, ...], each layer's slots contiguous
            for layer in range(len(tensor)):
                release(tensor[layer, first:last])

    def select_rows(self, rows):
        """Slots ``[0, len(rows))`` take the contents of slots ``rows``: beams reordered (a copy)."""
        self.move_rows(rows, torch.arange(len(rows), device=rows.device))

    def take(self, other, rows):
        """Copies the first ``rows`` slots of ``other`` (a cache of this kind, no longer) into this one."""
        for name, (row_dim, position_dim) in self.row_tensors().items():
            source = getattr(other, name).narrow(row_dim, 0, rows)
            target = getattr(self, name).narrow(row_dim, 0, rows)
            if position_dim is not None:
                source = source.narrow(position_dim, 0, min(other.extent, source.shape[position_dim]))
                target = target.narrow(position_dim, 0, source.shape[position_dim])
            target.copy_(source)
        self.extent = other.extent

    # -- prefix caching (``lmq.core.generation.prefix_cache``) ---------------------------

    prefix_variant = None  # what keys depend on beyond the tokens (Phi-3's longrope factors)

    def prefix_tensors(self):
        """The row tensors a cached prompt block holds: {name: (row dimension, position dimension)}."""
        return {name: dims for name, dims in self.row_tensors().items() if dims[1] is not None}

    def new_pool(self, positions):
        """Storage for ``positions`` prompt positions, laid out as one slot of each prefix tensor
        (``prefix_tensors``, the row dimension dropped): a chain of blocks stored in order is a
        run of positions, which attention reads as it reads a slot."""
        pool = {}
        for name, (row_dim, position_dim) in self.prefix_tensors().items():
            shape = list(getattr(self, name).select(row_dim, 0).shape)
            shape[position_dim - 1] = positions
            pool[name] = getattr(self, name).new_zeros(shape)
        return pool

    def read_positions(self, row, positions):
        """Positions ``positions`` (a long tensor) of slot ``row``: {name: tensor laid out as a slot}."""
        return {name: getattr(self, name).select(row_dim, row).index_select(position_dim - 1, positions)
                for name, (row_dim, position_dim) in self.prefix_tensors().items()}

    def write_positions(self, row, start, held):
        """Writes ``held`` ({name: tensor laid out as a slot}, as ``read_positions`` gives, or any
        view of that shape) into slot ``row`` from position ``start``."""
        for name, (row_dim, position_dim) in self.prefix_tensors().items():
            count = held[name].shape[position_dim - 1]
            getattr(self, name).select(row_dim, row).narrow(position_dim - 1, start, count).copy_(held[name])
            self.extent = max(self.extent, start + count)

    def release_positions(self, row, count):
        """Slot ``row``'s first ``count`` positions hold nothing any more (their keys are read from
        elsewhere: a prefix cache's pool): on a CPU their pages go back to the operating system."""
        if self.keys.device.type != "cpu" or count <= 0:
            return
        for tensor in (self.keys, self.values):  # [layers, slots, kv heads, positions, dim]
            for layer in range(len(tensor)):
                for head in range(tensor.shape[2]):
                    release(tensor[layer, row, head, :count])

    def step(self, positions, key_length):
        """Where a decode step of rows ``[0, len(positions))`` at ``positions`` writes and what it reads.

        Returns the slots to write [batch], how many slots to read, and the
        position each of those slots holds ([1, key_length]: slot i holds position i).
        """
        return positions, key_length, torch.arange(key_length, device=positions.device)[None]


class RollingKVCache(KVCache):
    """A KV cache for sliding-window attention that stops growing at the window.

    Position p lives in slot ``p % slots``: a long generation overwrites keys that
    have left every row's window, and each step reads at most ``slots`` keys.
    ``slots`` = window + prompt width - 1 (at most ``max_length``): a prompt goes in
    without wrapping, so each of its chunks finds every key of its queries' windows.
    """

    def __init__(self, num_layers, batch_size, num_heads, max_length, head_dim, dtype, device, window, prompt_width):
        self.window = window
        slots = min(max_length, window + prompt_width - 1)
        super().__init__(num_layers, batch_size, num_heads, slots, head_dim, dtype, device)
        # Slots not written yet hold "their own" position, which causal masking hides.
        self.slot_positions = torch.arange(slots, device=device).repeat(batch_size, 1)

    def row_tensors(self):
        return {**super().row_tensors(), "slot_positions": (0, 1)}

    def place(self, token_rows, positions, end):
        super().place(token_rows, positions, end)
        slots = positions % self.max_length
        self.slot_positions[token_rows, slots] = positions
        return slots

    def prefix_tensors(self):
        """Keys and values: a prompt block is never wrapped (slot = position), so its slot
        positions are its positions, set when it is written."""
        return {name: dims for name, dims in super().prefix_tensors().items() if name != "slot_positions"}

    def write_positions(self, row, start, held):
        super().write_positions(row, start, held)
        stop = start + held["keys"].shape[2]
        self.slot_positions[row, start:stop] = torch.arange(start, stop, device=self.slot_positions.device)

    def key_positions(self, first_row, rows, key_length):
        read = min(key_length, self.max_length)
        return read, self.slot_positions[first_row : first_row + rows, :read]

    def take(self, other, rows):
        if not isinstance(other, RollingKVCache):  # there slot i held position i, as here
            return super().take(other, rows)
        held = other.slot_positions[:rows]  # [rows, other's slots]
        target = held % self.max_length
        # Slots no key lands in are hidden (a position no query reaches) until written.
        self.slot_positions[:rows] = torch.iinfo(held.dtype).max // 2
        self.slot_positions[:rows].scatter_(1, target, held)
        for row in range(rows):
            self.keys[:, row, :, target[row]] = other.keys[:, row]
            self.values[:, row, :, target[row]] = other.values[:, row]
        self.extent = self.max_length
