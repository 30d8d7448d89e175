"""One step's input: the tokens of a forward pass, flattened, as typed tensors."""

from dataclasses import dataclass

import torch


@dataclass
class StepInput:
    """The tokens one forward pass runs: first one per decoding row (cache rows
    ``[0, decode_rows)``, each at its own position), then the prompt chunks, each a
    run of consecutive positions of one cache row. No padding: ``token_ids`` holds
    exactly the step's tokens.
    """

    token_ids: torch.Tensor  # [tokens] long
    positions: torch.Tensor  # [tokens] long: each token's position in its sequence
    token_rows: torch.Tensor  # [tokens] long: the cache row each token's keys go to
    decode_rows: int  # the first tokens, one per cache row [0, decode_rows)
    decode_width: int  # cache positions the decoding rows read: above each of their positions
    chunks: tuple  # (cache row, start position, length) of each prompt chunk, in token order
    requests: tuple  # the chunks' request ids (a model may keep more per request: an encoder's input)
    adapter_slots: torch.Tensor | None = None  # [tokens] long: each token's adapter (its slot, -1: none); None: no adapters
    # Leading prompt positions every decoding row holds alike, under one adapter (``Batch.shared_prompt``):
    # keys the rows may read once.
    decode_shared_prompt: int = 0
    # Each decoding row's leading prompt positions read from the prefix cache's pool (a ``Pooled``, or
    # None), and that pool ({name: tensor}); None when no row reads any (``KVCacheManager.pooled_rows``).
    decode_pooled: list | None = None
    pool: dict | None = None

    @classmethod
    def of(cls, decode_tokens, decode_positions, decode_width, chunks, device, adapters=None, shared_prompt=0,
           pooled=None, pool=None):
        """``decode_tokens``/``decode_positions`` [rows] tensors; ``chunks``: (cache row, start,
        token ids, request) per prompt chunk; ``adapters``: None, or (each decoding row's adapter
        slot [rows], each chunk's); ``shared_prompt``, ``pooled``, ``pool``: the decoding rows'
        ``decode_shared_prompt``, ``decode_pooled`` and ``pool``."""
        rows = len(decode_tokens)
        prompt_ids = [token for _, _, ids, _ in chunks for token in ids]
        prompt_positions = [start + i for _, start, ids, _ in chunks for i in range(len(ids))]
        prompt_rows = [row for row, _, ids, _ in chunks for _ in ids]
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        adapter_slots = None
        if adapters is not None:
            decode_slots, chunk_slots = adapters
            per_token = [slot for slot, (_, _, ids, _) in zip(chunk_slots, chunks) for _ in ids]
            adapter_slots = torch.cat([decode_slots, as_tensor(per_token)])
        return cls(
            token_ids=torch.cat([decode_tokens, as_tensor(prompt_ids)]),
            positions=torch.cat([decode_positions, as_tensor(prompt_positions)]),
            token_rows=torch.cat([torch.arange(rows, device=device), as_tensor(prompt_rows)]),
            decode_rows=rows,
            decode_width=decode_width,
            chunks=tuple((row, start, len(ids)) for row, start, ids, _ in chunks),
            requests=tuple(request for *_, request in chunks),
            adapter_slots=adapter_slots,
            decode_shared_prompt=shared_prompt,
            decode_pooled=pooled,
            pool=pool,
        )

    @classmethod
    def of_prompts(cls, token_ids, rows, start=0):
        """Prompt chunks of equal length: ``token_ids`` [batch, seq] from position ``start``
        into cache ``rows`` [batch] (padding after a prompt goes in too, and means nothing)."""
        batch, length = token_ids.shape
        positions = torch.arange(start, start + length, device=token_ids.device)
        return cls(
            token_ids=token_ids.flatten(),
            positions=positions.repeat(batch),
            token_rows=rows.repeat_interleave(length),
            decode_rows=0,
            decode_width=0,
            chunks=tuple((row, start, length) for row in rows.tolist()),
            requests=(),
        )

    @property
    def tokens(self):
        return len(self.token_ids)
