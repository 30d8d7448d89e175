"""Per-row logits processing: penalties, logit bias, min-p, and the log-probabilities a row reports.

OpenAI's and vLLM's sampling fields change a row's logits before its token sampler
chooses. They are applied here, once, to the rows that ask for them, in the same
step as the other rows (``PerRequestSampler.choose``), by vLLM's formulas:

- ``logit_bias``: added to the raw logits of its tokens;
- ``presence_penalty``, ``frequency_penalty``: over the tokens the row has generated,
  ``logits -= presence * (count > 0) + frequency * count``;
- ``min_p``: tokens whose probability (after temperature) is below ``min_p`` times the
  most likely token's are taken out.

A row's reported log-probabilities are ``log_softmax(processed logits / temperature)``:
after the logit bias, the penalties and the temperature, before any truncation (top-k,
top-p, min-p), so the chosen token's is that of the distribution it was drawn from
before the sampler cut it down. A greedy row's temperature is 1: its raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RowProcessing:
    """One request's processing; the default asks for nothing."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)  # token id -> bias
    min_p: float = 0.0
    logprobs: int | None = None  # None: none reported; k: the chosen token's and the k most likely tokens'

    @property
    def changes_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_p)

    @property
    def asks_anything(self) -> bool:
        return self.changes_logits or self.logprobs is not None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``top`` most likely (token id, log-probability)."""

    token_id: int
    logprob: float
    top: list


class BatchProcessing:
    """Every request's ``RowProcessing`` as columns, applied to the rows of a step together.

    Per request: penalties and min-p as columns indexed by request id, logit biases as
    (request, token, bias) triples. What each row reported is kept by request until read.
    """

    def __init__(self, processing: list[RowProcessing | None], vocabulary_size: int):
        processing = [p or RowProcessing() for p in processing]
        for request, each in enumerate(processing):
            too_large = [token for token in each.logit_bias if not 0 <= int(token) < vocabulary_size]
            if too_large:
                raise ValueError(
                    f"Prompt {request}'s logit_bias names token {too_large[0]}, outside the vocabulary "
                    f"(0 to {vocabulary_size - 1})."
                )

        def column(name):
            return torch.tensor([float(getattr(p, name)) for p in processing])

        self.presence, self.frequency, self.min_p = column("presence_penalty"), column("frequency_penalty"), column("min_p")
        self.penalized = (self.presence != 0) | (self.frequency != 0)
        biases = [(request, int(token), float(bias)) for request, p in enumerate(processing) for token, bias in p.logit_bias.items()]
        self.bias_request, self.bias_token, self.bias_value = (
            torch.tensor([entry[i] for entry in biases], dtype=dtype)
            for i, dtype in ((0, torch.long), (1, torch.long), (2, torch.float32))
        )
        self.top = torch.tensor([-1 if p.logprobs is None else p.logprobs for p in processing])
        self.changes_logits = any(p.changes_logits for p in processing)
        self.reported: dict[int, list[TokenLogprob]] = {}

    def to(self, device):
        for name in ("presence", "frequency", "min_p", "penalized", "bias_request", "bias_token", "bias_value", "top"):
            setattr(self, name, getattr(self, name).to(device))

    def process(self, rows, logits, temperature):
        """(adjusted, to sample from): the step's logits [rows, vocab] after each row's logit bias
        and penalties, then also min-p's cut; the same tensor when no row asks for any.
        ``rows`` is the batch's per-row tensors; ``temperature`` [rows] each row's."""
        if not self.changes_logits:
            return logits, logits
        requests = rows["request"]
        logits = logits.float().clone()
        if len(self.bias_request):
            row_of_request = torch.full((len(self.top),), -1, dtype=torch.long, device=logits.device)
            row_of_request[requests] = torch.arange(len(requests), device=logits.device)
            bias_rows = row_of_request[self.bias_request]
            present = bias_rows >= 0
            logits.index_put_((bias_rows[present], self.bias_token[present]), self.bias_value[present], accumulate=True)
        penalized = self.penalized[requests].nonzero()[:, 0]
        if len(penalized):
            counts = generated_counts(rows, penalized, logits.shape[-1])
            presence = self.presence[requests[penalized]][:, None]
            frequency = self.frequency[requests[penalized]][:, None]
            logits[penalized] -= presence * (counts > 0) + frequency * counts
        min_p = self.min_p[requests]
        cut = (min_p > 0).nonzero()[:, 0]
        if not len(cut):
            return logits, logits
        probabilities = torch.softmax(logits[cut] / temperature[cut, None], dim=-1)
        floor = min_p[cut, None] * probabilities.max(dim=-1, keepdim=True).values
        truncated = logits.clone()
        truncated[cut] = logits[cut].masked_fill(probabilities < floor, float("-inf"))
        return logits, truncated

    def record(self, requests, logits, temperature, tokens):
        """Keeps, for the rows whose requests ask, the chosen tokens' log-probabilities and the top ones'.
        ``logits`` are the adjusted logits, before min-p's cut (see the module's docstring)."""
        top = self.top[requests]
        asking = (top >= 0).nonzero()[:, 0]
        if not len(asking):
            return
        logprobs = torch.log_softmax(logits[asking].float() / temperature[asking, None], dim=-1)
        chosen = logprobs.gather(1, tokens[asking][:, None])[:, 0]
        width = int(top[asking].max())
        top_values, top_ids = logprobs.topk(width, dim=-1) if width else (logprobs[:, :0], logprobs[:, :0].long())
        for request, k, token, value, ids, values in zip(
            requests[asking].tolist(), top[asking].tolist(), tokens[asking].tolist(),
            chosen.tolist(), top_ids.tolist(), top_values.tolist(),
        ):
            self.reported.setdefault(request, []).append(TokenLogprob(token, value, list(zip(ids[:k], values[:k]))))

    def take(self, request: int) -> list[TokenLogprob] | None:
        """What request ``request`` reported (None when it asked for nothing), forgotten once read."""
        if int(self.top[request]) < 0:
            return None
        return self.reported.pop(request, [])


def generated_counts(rows, which, vocabulary_size):
    """How often each token occurs in the completions so far of rows ``which``: [len(which), vocab]."""
    sequence = rows["sequence"][which]
    positions = torch.arange(sequence.shape[1], device=sequence.device)[None, :]
    generated = (positions >= rows["start"][which][:, None]) & (positions < rows["length"][which][:, None])
    counts = torch.zeros(len(which), vocabulary_size, device=sequence.device)
    return counts.scatter_add_(1, sequence, generated.float())
