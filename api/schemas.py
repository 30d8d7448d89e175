"""Request and response bodies of the HTTP API, and the one job request model.

Request models are built from the settings' limits (`job_request`), so the
limits show in the OpenAPI document and every bad body is a 422 that names
its field. The CLI builds the same body from its flags and files and checks
it through the same model (`parse_job`), so `lmq generate` refuses exactly
what the server refuses, before any model loads. Unknown fields are refused:
a misspelt parameter in a batch job of a million prompts should fail at once,
not be silently ignored.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lmq.core.config import Limits
from lmq.core.store import Job, JobEvent, JobItem, Preset
from lmq.core.names import (
    DTYPES,
    PRESET_NAME_PATTERN,
    SAMPLER_ARGUMENTS,
    SAMPLER_NAMES,
    JobKind,
    JobState,
    check_preset_name,
)

SamplerName = Literal[SAMPLER_NAMES]
Dtype = Literal[DTYPES]
MAX_SEED = 2**31 - 1
MAX_TOKEN_ID = 2**31 - 1
GENERATE_TEXT_FIELDS = ("prompt", "encoder_text", "messages")  # a generate input gives exactly one
# The branch tags pydantic puts into an error's location; field names leave them out.
SAMPLER_BY_NAME, SAMPLER_WITH_ARGUMENTS = "sampler-name", "sampler-object"
UNION_TAGS = ("generate", "fit", SAMPLER_BY_NAME, SAMPLER_WITH_ARGUMENTS)


def _a_string(value: Any) -> Any:
    """A JSONL prompt of 5 is named as a non-string ("must be a string, got int")."""
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "must be a string, got {type}", {"type": type(value).__name__})
    return value


def _encodable(value: str) -> str:
    """Lone surrogates pass JSON parsing but no database can store them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def _no_nul(value: str) -> str:
    """Plain SQL text columns (PostgreSQL's) refuse NUL characters."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _preset_name(value: str) -> str:
    try:
        return check_preset_name(value)
    except ValueError as error:
        raise PydanticCustomError("preset_name", str(error)) from None


def text(max_length: int, *, min_length: int = 1, label: bool = False):
    """A string type with length limits; a label (stored in a plain SQL column) also refuses NUL."""
    checks = (AfterValidator(_encodable), AfterValidator(_no_nul)) if label else (AfterValidator(_encodable),)
    return Annotated[
        str, StringConstraints(min_length=min_length, max_length=max_length), BeforeValidator(_a_string), *checks
    ]


# The store name of a fit job's result; the pattern shows in OpenAPI, the check names the rule.
PresetName = Annotated[
    str,
    BeforeValidator(_a_string),
    AfterValidator(_preset_name),
    Field(json_schema_extra={"pattern": PRESET_NAME_PATTERN}),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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


@lru_cache
def job_request(limits: Limits) -> Any:
    """The POST /v1/jobs body, a generate or a fit job told apart by `kind`, with this deployment's limits."""
    Prompt = text(limits.prompt_chars)
    CustomId = text(256, min_length=0, label=True)
    PresetHandle = text(512, label=True)

    NewTokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)]
    Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
    TokenIds = list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]
    Stop = list[text(256)]

    class Message(Strict):
        role: text(64)
        content: text(limits.prompt_chars, min_length=0)

    class ItemParams(Strict):
        """One input's own settings, in place of the job's (`stop_token_ids: []`: none)."""

        max_new_tokens: NewTokens | None = None
        sampler: Sampler | None = None
        seed: Seed | None = None
        stop_token_ids: TokenIds | None = Field(None, max_length=64)
        stop: Stop | None = Field(None, max_length=16)

    class GenerateInput(Strict):
        """One input: a `prompt` (causal LMs), an `encoder_text` (sequence-to-sequence
        models such as Bart) or chat `messages` (a preset with a chat template)."""

        custom_id: CustomId | None = None
        prompt: Prompt | None = None
        encoder_text: Prompt | None = None
        messages: list[Message] | None = Field(None, min_length=1, max_length=1024)
        params: ItemParams | None = None

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

    class GenerateParams(Strict):
        max_length: int | None = Field(None, ge=1, le=limits.max_length)
        max_new_tokens: NewTokens | None = None
        sampler: Sampler = "greedy"
        seed: Seed | None = None
        stop_token_ids: Literal["auto"] | TokenIds | None = Field("auto", max_length=64)
        stop: Stop | None = Field(None, max_length=16)
        strip_prompt: bool = False
        dtype: Dtype | None = None
        micro_batch_size: int | None = Field(None, ge=1, le=limits.batch_size)

    class GenerateJobRequest(Strict):
        kind: Literal["generate"]
        preset: PresetHandle
        inputs: list[GenerateInput] = Field(min_length=1, max_length=limits.inputs_per_job)
        params: GenerateParams = Field(default_factory=GenerateParams)

    class TrainingExample(Strict):
        """A `text` (causal LMs) or an `encoder_text` and its `decoder_text` (sequence-to-sequence models)."""

        text: Prompt | None = None
        encoder_text: Prompt | None = None
        decoder_text: Prompt | None = None

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
        epochs: int = Field(1, ge=1, le=limits.epochs)
        batch_size: int = Field(8, ge=1, le=limits.batch_size)
        learning_rate: float = Field(2e-5, gt=0, le=1)
        sequence_length: int | None = Field(None, ge=2, le=limits.max_length)
        lora_rank: int | None = Field(None, ge=1, le=1024)
        dtype: Dtype | None = None

    class FitJobRequest(Strict):
        kind: Literal["fit"]
        preset: PresetHandle
        training_data: list[TrainingExample] = Field(min_length=1, max_length=limits.inputs_per_job)
        validation_data: list[TrainingExample] | None = Field(None, max_length=limits.inputs_per_job)
        hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
        output_preset: PresetName = Field(description="the store name of the result")

    return Union[GenerateJobRequest, FitJobRequest]


@lru_cache
def _job_adapter(limits: Limits) -> TypeAdapter:
    return TypeAdapter(Annotated[job_request(limits), Field(discriminator="kind")])


def parse_job(body: dict, limits: Limits) -> BaseModel:
    """The job request a body describes, or pydantic's ValidationError (see `problems`)."""
    return _job_adapter(limits).validate_python(body)


def problems(errors: list[dict]) -> list[dict]:
    """Validation problems (`ValidationError.errors()`), each at the field it is about (union tags left out).

    A bad or missing `kind` is placed on `kind` itself, not the whole body.
    """
    found = []
    for problem in errors:
        location = [part for part in problem["loc"] if not is_union_tag(part)]
        if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            location.append(problem["ctx"]["discriminator"].strip("'"))
        found.append({**problem, "loc": location})
    return found


def is_union_tag(part) -> bool:
    """pydantic's "literal[...]", "function-after[...]" or one of the tags above."""
    return isinstance(part, str) and ("[" in part or part in UNION_TAGS)


def field_name(location: list) -> str:
    """["params", "sampler", "p"] -> "params.sampler.p"; ["inputs", 0, "prompt"] -> "inputs[0].prompt"."""
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else f".{part}" if name else str(part)
    return name


def job_params(model: BaseModel) -> dict:
    """Parameters as the job runner reads them: no nulls, samplers as plain JSON."""
    return model.model_dump(mode="json", exclude_none=True)


def jsonl(record: dict) -> str:
    """One line of a JSONL file or an NDJSON stream (results, listings): text kept as it is."""
    return json.dumps(record, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- responses: the models and the shapes
# The store hands back its records; these functions shape them into the
# contract's JSON (the models below describe the same shapes in OpenAPI).


def job_summary(job: Job) -> dict:
    """The job as `GET /v1/jobs/{id}` shows it."""
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.state,
        "preset": job.preset,
        "counts": {"total": job.total, "completed": job.completed, "failed": job.failed},
        "progress": job.progress,
        "error": job.error,
        "attempts": job.attempts,
        "tenant": job.tenant,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "output_preset": job.output_preset,
    }


def result_line(item: JobItem) -> dict:
    """One line of a generate job's results (`GET /v1/jobs/{id}/results`, `lmq generate -o`)."""
    return {
        "index": item.index,
        "custom_id": item.custom_id,
        "output": item.output,
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "finish_reason": item.finish_reason,
        "error": item.error,
    }


def event_line(event: JobEvent) -> dict:
    return {"id": event.id, "type": event.type, "created_at": isoformat(event.created_at), **event.data}


def preset_summary(preset: Preset, viewer: str | None = None) -> dict:
    """A stored preset as the CLI's local user sees it (viewer None: everything, its path too),
    or as tenant `viewer` does over the API: never the server path, and of a preset shared by
    another tenant not where it came from (its job, source and parent are that tenant's)."""
    summary = {
        "name": preset.name,
        "architecture": preset.architecture,
        "owner": preset.tenant,
        "source": preset.source,
        "parent": preset.parent,
        "job_id": preset.job_id,
        "details": preset.details,
        "created_at": isoformat(preset.created_at),
    }
    if viewer is None:
        return {**summary, "path": preset.path}
    if viewer != preset.tenant:
        return {**summary, "source": None, "parent": None, "job_id": None}
    return summary


def isoformat(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()



class Counts(BaseModel):
    total: int
    completed: int
    failed: int


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobState
    preset: str
    counts: Counts
    progress: float
    error: str | None
    attempts: int
    tenant: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    output_preset: str | None


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="pass as `cursor` for the next (older) page")


class EventOut(BaseModel):
    """A state change, a model load, a fit step (step, loss, tokens_per_second), ..."""

    model_config = ConfigDict(extra="allow")

    id: int
    type: str
    created_at: str


class EventPage(BaseModel):
    events: list[EventOut]


class PresetOut(BaseModel):
    """No path: where a preset lies on the server is never shown over the API."""

    name: str
    architecture: str | None
    builtin: bool = False
    owner: str | None = Field(None, description="the tenant whose preset it is (none for a built-in)")
    handle: str | None = None
    source: str | None = None
    parent: str | None = None
    job_id: str | None = None
    description: str | None = None
    details: dict = Field(default_factory=dict)
    created_at: str | None = None


class PresetList(BaseModel):
    presets: list[PresetOut]


class PresetShareIn(BaseModel):
    tenant: str = Field(
        min_length=1, max_length=128, pattern=r"^[^\s]+$", description='a tenant to share with, or "*" for every tenant'
    )


class PresetShareOut(BaseModel):
    name: str
    shared_with: list[str] = Field(description='the tenants who may use the preset ("*": every tenant)')


class BuiltinPreset(BaseModel):
    name: str
    handle: str
    description: str
    params: str


class ArchitectureOut(BaseModel):
    name: str
    task_kind: str
    plugin: str
    hf_model_types: list[str]
    presets: list[BuiltinPreset]


class ArchitectureList(BaseModel):
    architectures: list[ArchitectureOut]
    load_errors: list[str] = Field(description="plugins that failed to load, and why")


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    database: Check
    broker: Check
