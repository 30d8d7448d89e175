"""The model runner: one step's forward pass, and the logits of the tokens that need them."""

import torch


class ModelRunner:
    """Runs a ``StepInput`` through a model (``DecoderOnlyModel``, or one with ``prefill`` and ``step``)."""

    def __init__(self, model):
        self.model = model

    def run(self, cache, step):
        """The step's tokens through the model, their keys and values into ``cache``:
        hidden states [tokens, hidden], in the step's token order."""
        if hasattr(self.model, "forward"):
            return self.model.forward(cache, step)
        return self._prefill_and_step(cache, step)

    def _prefill_and_step(self, cache, step):
        """A model without ``forward``: the decoding rows in one ``step`` call, then the
        chunks in one ``prefill`` call per start position (right-padded)."""
        pieces = []  # hidden states of the decoding rows, then of each chunk
        if step.decode_rows:
            rows = slice(0, step.decode_rows)
            pieces.append(self.model.step(cache, step.token_ids[rows], step.positions[rows], step.decode_width))
        offset, chunk_pieces = step.decode_rows, []
        for _, _, length in step.chunks:
            chunk_pieces.append(slice(offset, offset + length))
            offset += length
        for start in sorted({start for _, start, _ in step.chunks}):  # chunks continuing from one position
            which = [i for i, chunk in enumerate(step.chunks) if chunk[1] == start]
            prompts = [step.token_ids[chunk_pieces[i]].tolist() for i in which]
            rows = torch.tensor([step.chunks[i][0] for i in which], device=step.token_ids.device)
            extra = {"start": start} if start else {}  # a model without chunked prefill takes no start
            hidden = self.model.prefill(cache, prompts, rows, [step.requests[i] for i in which], **extra)
            for j, i in enumerate(which):
                chunk_pieces[i] = hidden[j, : step.chunks[i][2]]
        return torch.cat(pieces + chunk_pieces)

    def logits(self, hidden):
        """Hidden states [..., hidden] -> next-token logits [..., vocab]."""
        return self.model.logits(hidden)
