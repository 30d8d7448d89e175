"""Beam search: the most likely whole sequence, not the most likely next token."""

import torch

from lmq.core.generation import Completion
from lmq.core.samplers.base import Sampler


class BeamSampler(Sampler):
    """Keeps the ``num_beams`` sequences with the highest summed log-probability.

    Each request takes ``num_beams`` rows (its prompt is prefilled once, the cache
    row repeated). Each step keeps the best ``num_beams`` of (beams x vocab)
    continuations per request and reorders the rows to match. A beam that emits
    a stop token or reaches its limit is finished: it keeps its score and still
    competes, so a short likely sequence can beat a long one. Scores use the
    temperature-scaled distribution. Stop strings cut, and ``stream`` receives,
    the best beam once the search is over. With ``return_all_beams`` the result
    also lists every beam with its score, best first (KerasHub returns all beams
    with their scores too).
    """

    name = "beam"
    commits_each_step = False
    independent_rows = False

    def __init__(self, num_beams=5, return_all_beams=False, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
        self.num_beams = num_beams
        self.return_all_beams = return_all_beams

    def rows_per_prompt(self, vocabulary_size):
        return self.num_beams

    def admit(self, batch, rows, hidden):
        # At first every beam of a request is the same sequence: only beam 0 may expand.
        score = torch.full((len(rows["request"]) // self.num_beams, self.num_beams), float("-inf"))
        score[:, 0] = 0.0
        rows["score"] = score.flatten().to(rows["request"].device)  # [rows]

    def choose(self, batch, logits):
        beams, vocab = self.num_beams, logits.shape[-1]
        requests = len(logits) // beams
        log_probs = torch.log_softmax(logits.float() / self.temperature, dim=-1)  # [rows, vocab]
        # A finished beam has one continuation: itself (token 0, which it ignores, at no cost).
        frozen = torch.full_like(log_probs[:1], float("-inf"))
        frozen[0, 0] = 0.0
        log_probs = torch.where(batch.rows["done"][:, None], frozen, log_probs)
        candidates = (batch.rows["score"][:, None] + log_probs).view(requests, beams * vocab)
        top_scores, index = candidates.topk(beams, dim=-1)  # [requests, beams]
        first_row = torch.arange(requests, device=logits.device)[:, None] * beams
        batch.select((first_row + index // vocab).flatten())  # the beam each new beam extends
        batch.rows["score"] = top_scores.flatten()
        return (index % vocab).flatten()

    def finish(self, rows):
        # Beams still at -inf never held a sequence (more beams than continuations).
        ranked = sorted((row for row in rows if row.score > float("-inf")), key=lambda row: -row.score)
        beams = [(row.token_ids, row.score, row.finish_reason) for row in ranked]
        best = ranked[0]
        return Completion(best.token_ids, best.finish_reason, beams if self.return_all_beams else None)

    def get_config(self):
        config = {"num_beams": self.num_beams, "return_all_beams": self.return_all_beams}
        return {**super().get_config(), **config}
