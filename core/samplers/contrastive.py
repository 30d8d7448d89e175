"""Contrastive search (Su et al. 2022): likely tokens that do not repeat what came before."""

import torch

from lmq.core.samplers.base import Sampler


class ContrastiveSampler(Sampler):
    """Picks, among the ``k`` most likely tokens, the one with the best

        (1 - alpha) * p(token) - alpha * max cosine(h(token), h(previous token) for each previous token)

    where h is the backbone's final hidden state (after the last norm), as in
    KerasHub, and the previous tokens are the row's prompt and completion so far.
    Each request takes ``k`` rows, one per candidate: each step runs every
    candidate one step ahead (``batch.look_ahead``), and the chosen one's row,
    logits and hidden state carry on in all ``k``. ``alpha=0`` is greedy search.
    """

    name = "contrastive"
    independent_rows = False
    reads_prompt_states = True

    def __init__(self, k=5, alpha=0.6, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
        self.k = k
        self.alpha = alpha

    def rows_per_prompt(self, vocabulary_size):
        return min(self.k, vocabulary_size)

    def admit(self, batch, rows, hidden):
        # Unit hidden states of every token so far, by position; cosine is then a dot product.
        k = batch.rows_per_prompt
        history = hidden.new_zeros(len(hidden), batch.max_length, hidden.shape[-1], dtype=torch.float32)
        history[:, : hidden.shape[1]] = torch.nn.functional.normalize(hidden.float(), dim=-1)
        rows["history"] = history.repeat_interleave(k, dim=0)  # [rows, slots, hidden]

    def choose(self, batch, logits):
        k = batch.rows_per_prompt
        requests = len(logits) // k
        # The k rows of a request hold the same sequence: candidates from the first.
        probabilities, candidates = self.compute_probabilities(logits[::k]).topk(k, dim=-1)  # [requests, k]
        hidden = batch.look_ahead(candidates.flatten())  # [rows, hidden]: a request's row j runs candidate j
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        history = batch.rows["history"][::k]  # [requests, slots, hidden]
        similarity = unit.view(requests, k, -1) @ history.transpose(1, 2)  # [requests, k, slots]
        slots = torch.arange(history.shape[1], device=logits.device)
        seen = slots < batch.rows["length"][::k, None]  # [requests, slots]: prompt and tokens chosen so far
        degeneration = similarity.masked_fill(~seen[:, None, :], -1.0).max(dim=-1).values  # [requests, k]
        scores = (1 - self.alpha) * probabilities - self.alpha * degeneration  # [requests, k]
        chosen = torch.arange(requests, device=logits.device) * k + scores.argmax(dim=-1)  # [requests]: a row
        source = chosen.repeat_interleave(k)
        batch.select(source)
        rows = torch.arange(len(source), device=logits.device)
        batch.rows["history"][rows, batch.rows["length"].clamp(max=history.shape[1] - 1)] = unit[source]
        batch.logits = batch.model.logits(hidden[chosen]).repeat_interleave(k, dim=0)
        return candidates.flatten()[source]

    def get_config(self):
        return {**super().get_config(), "k": self.k, "alpha": self.alpha}
