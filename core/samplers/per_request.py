"""One token sampler per request, every row choosing in one batch."""

import copy
import random

import torch

from lmq.core.samplers.base import Sampler
from lmq.core.samplers.processing import BatchProcessing


class PerRequestSampler(Sampler):
    """Request i picks its tokens with ``samplers[i]``, a token sampler (greedy, top-k,
    top-p, random) with its own settings, so that requests which differ only in how they
    pick tokens (an OpenAI batch's per-line temperature and top_p) decode in one pass.

    ``compile(sampler=[...])`` makes one from a list, one sampler per prompt. Requests whose
    samplers are of one kind (the class and the settings that shape a draw: top-k's ``k``,
    top-p's ``k``) choose together, in one call of that sampler with their own
    ``row_parameters`` (temperature, top-p's ``p``) as columns: a step costs a call per kind
    in the batch, not one per row. A row draws from its request's own generator, so a
    seeded request gives what its sampler gives it alone, whatever its neighbours. Searches
    (beam, contrastive) weigh several rows per request together and run apart.

    ``processing`` (a ``BatchProcessing``, optional) changes the rows' logits before they
    choose (penalties, logit bias, min-p, a grammar's mask), keeps the log-probabilities rows
    report and says which rows' grammars completed.
    """

    def __init__(self, samplers, processing: BatchProcessing | None = None):
        samplers = list(samplers)
        for request, sampler in enumerate(samplers):
            token_sampler = isinstance(sampler, Sampler) and sampler.independent_rows
            if not token_sampler or isinstance(sampler, PerRequestSampler):
                raise ValueError(
                    "A per-request sampler takes token samplers (greedy, top_k, top_p, random); "
                    f"request {request}'s is {getattr(sampler, 'name', None) or type(sampler).__name__!r}."
                )
        self.samplers = samplers
        self.processing = processing
        kinds = {}  # kind -> its number
        numbers = [kinds.setdefault(_kind(sampler), len(kinds)) for sampler in samplers]
        self.kind_of_request = torch.tensor(numbers, dtype=torch.long)
        self.prototypes = [None] * len(kinds)  # a sampler of each kind, its row parameters replaced each step
        for kind, sampler in zip(self.kind_of_request.tolist(), samplers):
            self.prototypes[kind] = self.prototypes[kind] or sampler
        names = {name for sampler in samplers for name in sampler.row_parameters}
        self.columns = {  # parameter -> each request's value (requests of kinds without it: 1)
            name: torch.tensor([float(getattr(s, name, 1.0)) for s in samplers], dtype=torch.float32) for name in names
        }

    @property
    def seed(self):
        """``generate``'s default seeds: each request's sampler's; an unseeded request among
        seeded ones draws one of its own (None when none is seeded)."""
        seeds = [sampler.seed for sampler in self.samplers]
        if all(seed is None for seed in seeds):
            return None
        return [random.randrange(2**31) if seed is None else seed for seed in seeds]

    def admit(self, batch, rows, hidden):
        requests = rows["request"]
        if int(requests.max()) >= len(self.samplers):
            raise ValueError(
                f"The per-request sampler has {len(self.samplers)} samplers; prompt {int(requests.max())} has none."
            )
        device = requests.device
        self.kind_of_request = self.kind_of_request.to(device)
        self.columns = {name: column.to(device) for name, column in self.columns.items()}
        if self.processing is not None:
            self.processing.to(device)

    def choose(self, batch, logits):
        if self.processing is None:
            return self._choose(batch, logits)
        temperature = self.columns["temperature"][batch.rows["request"]]
        adjusted, truncated = self.processing.process(batch.rows, logits, temperature)
        tokens = self._choose(batch, truncated)
        self.processing.record(batch.rows["request"], adjusted, temperature, tokens)
        self.processing.accept(batch.rows, tokens)
        return tokens

    def completed_rows(self):
        return None if self.processing is None else self.processing.completed

    def _choose(self, batch, logits):
        requests = batch.rows["request"]
        generators = batch.row_generators()
        kinds = self.kind_of_request[requests]
        present = kinds.unique().tolist()
        if len(present) == 1:
            return self._of_kind(present[0], requests).next_token(logits, generators)
        tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
        for kind in present:
            rows = (kinds == kind).nonzero()[:, 0]
            own = None if generators is None else [generators[row] for row in rows.tolist()]
            tokens[rows] = self._of_kind(kind, requests[rows]).next_token(logits[rows], own)
        return tokens

    def _of_kind(self, kind, requests):
        """The sampler of ``kind`` for rows of ``requests``, each with its own row parameters."""
        sampler = copy.copy(self.prototypes[kind])
        for name in sampler.row_parameters:
            setattr(sampler, name, self.columns[name][requests][:, None])
        return sampler

    def get_config(self):
        return {"samplers": [{"name": sampler.name, **sampler.get_config()} for sampler in self.samplers]}


def _kind(sampler):
    """What rows must share to choose in one call: the class and its settings but the row
    parameters and the seed (each row has its own generator)."""
    shared = {k: v for k, v in sampler.get_config().items() if k not in sampler.row_parameters and k != "seed"}
    return type(sampler), tuple(sorted(shared.items()))
