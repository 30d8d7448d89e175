"""What a fit job may be given, its defaults (stated here only), and how its training divides into steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lmq.core.config import Limits
from lmq.core.domain.fields import Dtype, Strict, text


@dataclass(frozen=True)
class FitDefaults:
    """What a fit job trains with when its hyperparameters do not say: the request model, the job's
    step count and the worker all read these."""

    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 2e-5


FIT_DEFAULTS = FitDefaults()


@dataclass(frozen=True)
class FitSteps:
    """How a fit job's training divides into steps: its counts are steps, from submission on."""

    batch_size: int
    epochs: int
    per_epoch: int

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs


def fit_steps(examples: int, hyperparameters: dict) -> FitSteps:
    """The steps of `examples` training examples, as `CausalLM.fit` takes them (a last short batch is a step)."""
    batch_size = hyperparameters.get("batch_size") or FIT_DEFAULTS.batch_size
    epochs = hyperparameters.get("epochs") or FIT_DEFAULTS.epochs
    return FitSteps(batch_size, epochs, per_epoch=math.ceil(examples / batch_size))


class FitModels(NamedTuple):
    example: Any  # TrainingExample: one training (or validation) row
    hyperparameters: Any  # Hyperparameters


@lru_cache
def fit_models(limits: Limits) -> FitModels:
    """A fit job's models with this deployment's limits (so OpenAPI shows them)."""
    Text = text(limits.prompt_chars)

    class TrainingExample(Strict):
        """A `text` (causal LMs) or an `encoder_text` and its `decoder_text` (sequence-to-sequence models)."""

        text: Text | None = None
        encoder_text: Text | None = None
        decoder_text: Text | None = None

        @model_validator(mode="after")
        def a_text(self):
            pair = (self.encoder_text, self.decoder_text)
            if self.text is not None and any(part is not None for part in pair):
                raise PydanticCustomError("several_texts", "give 'text' or 'encoder_text' and 'decoder_text', not both")
            if self.text is None and None in pair:
                if pair == (None, None):
                    missing = "text"
                else:
                    missing = "decoder_text" if self.decoder_text is None else "encoder_text"
                raise PydanticCustomError("missing_text", "missing field '{missing}'", {"missing": missing})
            return self

    class Hyperparameters(Strict):
        epochs: int = Field(FIT_DEFAULTS.epochs, ge=1, le=limits.epochs)
        batch_size: int = Field(FIT_DEFAULTS.batch_size, ge=1, le=limits.batch_size)
        learning_rate: float = Field(FIT_DEFAULTS.learning_rate, gt=0, le=1)
        sequence_length: int | None = Field(None, ge=2, le=limits.max_length)
        lora_rank: int | None = Field(None, ge=1, le=1024)
        dtype: Dtype | None = None

    return FitModels(TrainingExample, Hyperparameters)
