"""What a generate job's inputs and parameters may be: one model for an item (a generate input
and its own parameters) and one for the parameters an item may set, used by POST /v1/jobs, the
CLI, the Batch API's lines (each becomes an item) and the workers."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Annotated, Any, Literal, NamedTuple, Union

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator
from pydantic_core import PydanticCustomError

from lmq.core.config import Limits
from lmq.core.domain.fields import MAX_SEED, MAX_TOKEN_ID, Dtype, SamplerName, Strict, text
from lmq.core.domain.formats import ResponseFormat
from lmq.core.names import GENERATE_TEXT_FIELDS, SAMPLER_ARGUMENTS

# The branch tags pydantic puts into an error's location (see requests.problems).
SAMPLER_BY_NAME, SAMPLER_WITH_ARGUMENTS = "sampler-name", "sampler-object"
# Limits no deployment is below: what a model checks whatever the limits (the server applied its own).
NO_LIMITS = Limits(**{field.name: 2**62 for field in dataclasses.fields(Limits)})


class SamplerConfig(Strict):
    """A sampler with arguments, e.g. {"name": "top_p", "p": 0.9, "temperature": 0.7, "seed": 1}."""

    name: SamplerName
    temperature: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    k: int | None = Field(None, ge=1, le=100_000)
    p: float | None = Field(None, gt=0, le=1)
    num_beams: int | None = Field(None, ge=1, le=64)
    alpha: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def arguments_it_takes(self):
        given = {name for name in self.model_fields_set if getattr(self, name) is not None}
        unknown = given - {"name", "temperature", "seed"} - set(SAMPLER_ARGUMENTS[self.name])
        if unknown:
            context = {"name": self.name, "unknown": ", ".join(sorted(unknown))}
            raise PydanticCustomError("sampler_arguments", "sampler '{name}' takes no {unknown}", context)
        return self


def _sampler_form(value) -> str:
    return SAMPLER_WITH_ARGUMENTS if isinstance(value, (dict, SamplerConfig)) else SAMPLER_BY_NAME


# A name ("top_k") or an object ({"name": "top_k", "k": 5}); only the matching branch's errors are reported.
Sampler = Annotated[
    Union[Annotated[SamplerName, Tag(SAMPLER_BY_NAME)], Annotated[SamplerConfig, Tag(SAMPLER_WITH_ARGUMENTS)]],
    Discriminator(_sampler_form),
]


def _a_list(value: Any) -> Any:
    """`"stop": "."` is named as what it is, not as pydantic's "Input should be a valid list"."""
    if not isinstance(value, (list, tuple)):
        raise PydanticCustomError("list_type", "must be a list of strings, got {given}", {"given": repr(value)})
    return value


Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
# OpenAI's logit_bias: token ids (JSON keys are strings) to a bias from -100 to 100.
LogitBias = dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]]
MAX_CHOICES = 128  # OpenAI's most `n`
MAX_TOP_LOGPROBS = 20  # OpenAI's most `top_logprobs`
class ChoiceSettings(Strict):
    """How many choices an item makes and how its rows' logits are processed (lmq.core.samplers.processing);
    the defaults ask for nothing. `logprobs`: report each token's log-probability and its k most likely;
    `response_format`: the output's structure (a JSON schema, a regex...)."""

    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = Field(None, max_length=1024)
    min_p: float | None = Field(None, ge=0, le=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
TokenIds = list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]
Stop = Annotated[list[text(256)], BeforeValidator(_a_list)]


class GenerateModels(NamedTuple):
    params: Any  # GenerationParams: what one item may set, in place of the job's
    item: Any  # GenerateItem: one input of a generate job
    job_params: Any  # GenerateParams: the job's own


@lru_cache
def generate_models(limits: Limits) -> GenerateModels:
    """A generate job's models with this deployment's limits (so OpenAPI shows them)."""
    Prompt = text(limits.prompt_chars)
    NewTokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)]

    class Message(Strict):
        role: text(64)
        content: text(limits.prompt_chars, min_length=0)

    class GenerationParams(ChoiceSettings):
        """One input's own settings, in place of the job's (`stop_token_ids: []`: none)."""

        max_new_tokens: NewTokens | None = None
        sampler: Sampler | None = None
        seed: Seed | None = None
        stop_token_ids: TokenIds | None = Field(None, max_length=64)
        stop: Stop | None = Field(None, max_length=16)

    class GenerateItem(Strict):
        """One input: a `prompt` (causal LMs), an `encoder_text` (sequence-to-sequence
        models such as Bart) or chat `messages` (a preset with a chat template). `model`: an
        adapter preset to run it with, of the base model the job's preset is or is an adapter
        of (or that base itself), in place of the job's; its rows share the batch with the others'."""

        custom_id: text(256, min_length=0, label=True) | None = None
        model: text(512, label=True) | None = None
        prompt: Prompt | None = None
        encoder_text: Prompt | None = None
        messages: list[Message] | None = Field(None, min_length=1, max_length=1024)
        params: GenerationParams | None = None

        @model_validator(mode="after")
        def one_text(self):
            given = [name for name in GENERATE_TEXT_FIELDS if getattr(self, name) is not None]
            if not given:
                raise PydanticCustomError("missing_text", "missing field 'prompt' (or 'encoder_text', 'messages')")
            if len(given) > 1:
                raise PydanticCustomError(
                    "several_texts", "give one of {given}, not several", {"given": ", ".join(map(repr, given))}
                )
            return self

        @property
        def text_field(self) -> str:
            return next(name for name in GENERATE_TEXT_FIELDS if getattr(self, name) is not None)

        def stored_input(self) -> dict:
            """The input a job item keeps: no custom_id (a column of its own) and no nulls."""
            return self.model_dump(mode="json", exclude_none=True, exclude={"custom_id"})

    class GenerateParams(ChoiceSettings):
        max_length: int | None = Field(None, ge=1, le=limits.max_length)
        max_new_tokens: NewTokens | None = None
        sampler: Sampler = "greedy"
        seed: Seed | None = None
        stop_token_ids: Literal["auto"] | TokenIds | None = Field("auto", max_length=64)
        stop: Stop | None = Field(None, max_length=16)
        strip_prompt: bool = False
        dtype: Dtype | None = None
        micro_batch_size: int | None = Field(None, ge=1, le=limits.batch_size)
        # On a worker's shared engine, lower goes first: a job of priority -1 is admitted rows twice
        # as often as one of 0, and one of 1 half as often; none waits forever (docs/continuous-batching.md).
        priority: int = Field(0, ge=-3, le=3)

    return GenerateModels(GenerationParams, GenerateItem, GenerateParams)
