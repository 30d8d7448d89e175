"""Samplers that draw from the (truncated) distribution."""

import torch

from lmq.core.samplers.base import Sampler


def _draw(probabilities, generator):
    """One draw per row of ``probabilities`` [rows, n]; a list of generators gives each row its own."""
    if isinstance(generator, list):
        draws = [torch.multinomial(row[None], 1, generator=g)[0, 0] for row, g in zip(probabilities, generator)]
        return torch.stack(draws) if draws else probabilities.new_zeros(0, dtype=torch.long)
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


class RandomSampler(Sampler):
    """Draws from the full distribution."""

    name = "random"

    def get_next_token(self, probabilities, generator=None):
        return _draw(probabilities, generator)


class TopKSampler(Sampler):
    """Draws from the ``k`` most likely tokens."""

    name = "top_k"

    def __init__(self, k=5, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        self.k = k

    def get_next_token(self, probabilities, generator=None):
        top_probabilities, top_ids = probabilities.topk(min(self.k, probabilities.shape[-1]), dim=-1)
        choice = _draw(top_probabilities, generator)
        return top_ids.gather(-1, choice[:, None])[:, 0]

    def get_config(self):
        return {**super().get_config(), "k": self.k, "seed": self.seed}


class TopPSampler(Sampler):
    """Draws from the smallest set of tokens whose probability reaches ``p``.

    ``k`` (optional) first limits the candidates to the ``k`` most likely.
    """

    name = "top_p"
    row_parameters = ("temperature", "p")

    def __init__(self, p=0.1, k=None, seed=None, **kwargs):
        super().__init__(seed=seed, **kwargs)
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}.")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive integer or None, got {k!r}.")
        self.p = p
        self.k = k

    def get_next_token(self, probabilities, generator=None):
        k = probabilities.shape[-1] if self.k is None else min(self.k, probabilities.shape[-1])
        sorted_probabilities, sorted_ids = probabilities.topk(k, dim=-1)
        # Keep a token if the tokens before it have not yet reached p.
        before = sorted_probabilities.cumsum(-1) - sorted_probabilities
        kept = torch.where(before < self.p, sorted_probabilities, 0.0)
        choice = _draw(kept, generator)
        return sorted_ids.gather(-1, choice[:, None])[:, 0]

    def get_config(self):
        return {**super().get_config(), "p": self.p, "k": self.k, "seed": self.seed}
