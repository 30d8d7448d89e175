"""The sampler interface and the greedy sampler."""

import torch

from lmq.core import kernels
from lmq.core.generation import Completion
from lmq.core.layers.projection import cpu_float32_inference


class Sampler:
    """Chooses one token per row from ``logits`` [batch, vocab].

    Subclasses implement ``get_next_token(probabilities, generator)`` (KerasHub's
    method name); ``temperature`` divides the logits first. ``generator`` is one
    ``torch.Generator``, one per row (a list: the decode engine's seeded rows), or None.

    To the decode engine (``lmq.core.generation``) a sampler is its strategy: it
    says how many rows a request takes (``rows_per_prompt``), sets up what it
    keeps per row when requests join (``admit``), chooses each step's tokens
    (``choose``) and turns a finished request's rows into its result (``finish``).
    The defaults here are those of a sampler that draws one token per row.
    """

    name = None  # the short name ``compile(sampler=...)`` accepts
    commits_each_step = True  # a row's tokens are final as they come (beam search: only at the end)
    # A token sampler: a row's token depends on its own logits and generator alone, so rows
    # with different token samplers can choose in one batch (``PerRequestSampler``); a
    # search (beam, contrastive) weighs a request's rows together.
    independent_rows = True
    # Whether ``admit`` reads the prompts' hidden states (contrastive search): a prompt whose
    # KV comes from the prefix cache has none, so the engine then runs without that cache.
    reads_prompt_states = False
    # The settings that may differ between rows choosing together: ``PerRequestSampler``
    # sets each as a column [rows, 1] of the rows' own values, which the methods broadcast.
    row_parameters = ("temperature",)

    def __init__(self, temperature=1.0, seed=None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.temperature = temperature
        self.seed = seed

    def compute_probabilities(self, logits):
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def next_token(self, logits, generator=None):
        return self.get_next_token(self.compute_probabilities(logits), generator)

    def get_config(self):
        return {"temperature": self.temperature}

    # -- as the decode engine's strategy ----------------------------------------------

    def rows_per_prompt(self, vocabulary_size):
        """How many neighbouring batch rows a request takes."""
        return 1

    def admit(self, batch, rows, hidden):
        """Adds what this sampler keeps per row to ``rows``, the joining rows' tensors;
        ``hidden`` [prompts, width, hidden] are their prompts' hidden states."""

    def choose(self, batch, logits):
        """Each row's next token [rows] from its logits [rows, vocab]."""
        return self.next_token(logits, batch.row_generators())

    def completed_rows(self):
        """[rows] bool: the rows whose constraints ended with the tokens ``choose`` just chose
        (a complete grammar: they end as on a stop token), or None when none can."""
        return None

    def finish(self, rows):
        """A request's ``Completion`` from its finished rows (``FinishedRow``s)."""
        return Completion(rows[0].token_ids, rows[0].finish_reason)


class GreedySampler(Sampler):
    """Always the most likely token."""

    name = "greedy"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def next_token(self, logits, generator=None):
        """The first largest logit of each row: on a CPU, through lmq's C++ argmax (the same
        index, about 4x as fast as torch's over a step's rows; ``lmq.core.kernels``)."""
        kernel = kernels.argmax() if logits.dim() == 2 and cpu_float32_inference(logits) else None
        if kernel is not None and logits.is_contiguous() and logits.shape[-1]:
            return kernel(logits)
        return logits.argmax(dim=-1)

    def get_next_token(self, probabilities, generator=None):
        return probabilities.argmax(dim=-1)
