"""What the decode engine returns: one record per request."""

from dataclasses import dataclass


@dataclass
class FinishedRow:
    """A batch row whose decoding is over, as the sampler's ``finish`` receives it."""

    token_ids: list  # the completion (stop token included, when there is one)
    finish_reason: str  # "stop" or "length"
    score: float | None  # the strategy's ranking score (beam search), else None


@dataclass
class Completion:
    """One request's outcome: the sequence its sampler chose."""

    token_ids: list
    finish_reason: str
    # With ``BeamSampler(return_all_beams=True)``: every beam as (ids, log-probability, reason), best first.
    beams: list | None = None


@dataclass
class DecodeResult:
    """Every request's completion, in request order."""

    completions: list  # list of lists of ids
    finish_reasons: list
    beams: list | None = None  # per request, with ``BeamSampler(return_all_beams=True)``; else None

    @classmethod
    def of(cls, completions):
        beams = [c.beams for c in completions]
        return cls(
            completions=[c.token_ids for c in completions],
            finish_reasons=[c.finish_reason for c in completions],
            beams=beams if any(b is not None for b in beams) else None,
        )


@dataclass
class Generation:
    """One prompt's result, with what the service reports about it."""

    text: str | None  # None when the task has no preprocessor
    token_ids: list  # the completion's ids (stop token included, when there is one)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    # Each token's log-probability, with ``generate(processing=...)`` that asks (``lmq.core.samplers.processing``).
    logprobs: list | None = None
