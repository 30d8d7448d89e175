"""The KV cache: one preallocated tensor per model for keys and one for values, written in place."""

import torch


class KVCache:
    """Keys and values of every layer: [layers, batch, kv_heads, max_length, head_dim]."""

    def __init__(self, num_layers, batch_size, num_heads, max_length, head_dim, dtype, device):
        shape = (num_layers, batch_size, num_heads, max_length, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._rows = torch.arange(batch_size, device=device)

    @property
    def max_length(self):
        return self.keys.shape[3]

    def update(self, layer, keys, values, context):
        """Writes this step's keys/values [batch, heads, seq, dim]; returns what to attend to."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        if context.write_positions is None:  # prefill: positions [0, seq) of ``cache_rows``
            length = keys.shape[2]
            rows = slice(None) if context.cache_rows is None else context.cache_rows
            layer_keys[rows, :, :length] = keys
            layer_values[rows, :, :length] = values
            return keys, values
        # one new token per row, each row at its own position
        layer_keys[self._rows, :, context.write_positions] = keys[:, :, 0]
        layer_values[self._rows, :, context.write_positions] = values[:, :, 0]
        return (
            layer_keys[:, :, : context.key_length],
            layer_values[:, :, : context.key_length],
        )

    def select_rows(self, rows):
        """Keeps (or repeats) batch rows: drops finished rows, reorders beams."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]
        self._rows = torch.arange(len(rows), device=self.keys.device)

    def add_rows(self, count):
        """Appends ``count`` rows for prompts that join a running batch (prefill fills them).

        They start as copies of row 0: causal masking hides every slot until the new row writes it.
        """
        self.select_rows(torch.cat([self._rows, self._rows.new_zeros(count)]))

    def step(self, positions, key_length):
        """Where a decode step at ``positions`` [batch] writes and what it reads.

        Returns the slots to write [batch], how many slots to read, and the
        position each of those slots holds ([1, key_length]: slot i holds position i).
        """
        return positions, key_length, torch.arange(key_length, device=positions.device)[None]


class RollingKVCache(KVCache):
    """A KV cache for sliding-window attention that stops growing at the window.

    Position p lives in slot ``p % slots``: a long generation overwrites keys that
    have left every row's window, and each step reads at most ``slots`` keys.
    ``slots`` = window + prompt width - 1 (at most ``max_length``): enough that the
    padding the prefill writes after a short prompt never overwrites a key that
    row still sees (its own decode steps overwrite the padding).
    """

    def __init__(self, num_layers, batch_size, num_heads, max_length, head_dim, dtype, device, window, prompt_width):
        self.window = window
        slots = min(max_length, window + prompt_width - 1)
        super().__init__(num_layers, batch_size, num_heads, slots, head_dim, dtype, device)
        # Slots not written yet hold "their own" position, which causal masking hides.
        self.slot_positions = torch.arange(slots, device=device).repeat(batch_size, 1)

    def select_rows(self, rows):
        super().select_rows(rows)
        self.slot_positions = self.slot_positions[rows]

    def add_rows(self, count):
        super().add_rows(count)
        self.slot_positions[-count:] = torch.arange(self.max_length, device=self.slot_positions.device)

    def step(self, positions, key_length):
        slots = positions % self.max_length
        self.slot_positions[self._rows, slots] = positions
        read = min(key_length, self.max_length)
        return slots, read, self.slot_positions[:, :read]
