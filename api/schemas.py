"""Request and response bodies of the HTTP API.

Request models are built from the settings' limits (`job_request`), so the
limits show in the OpenAPI document and every bad body is a 422 that names
its field. Unknown fields are refused: a misspelt parameter in a batch job
of a million prompts should fail at once, not be silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from core.config import Limits

SamplerName = Literal["greedy", "top_k", "top_p", "random", "beam", "contrastive"]
Dtype = Literal["float32", "float16", "bfloat16"]
PRESET_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_SEED = 2**31 - 1
MAX_TOKEN_ID = 2**31 - 1
# What each sampler takes besides temperature and seed (core.samplers' constructors).
SAMPLER_ARGUMENTS = {
    "greedy": set(),
    "random": set(),
    "top_k": {"k"},
    "top_p": {"p", "k"},
    "beam": {"num_beams"},
    "contrastive": {"k", "alpha"},
}


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


def text(max_length: int, *, min_length: int = 1, label: bool = False):
    """A string type with length limits; a label (stored in a plain SQL column) also refuses NUL."""
    checks = (AfterValidator(_encodable), AfterValidator(_no_nul)) if label else (AfterValidator(_encodable),)
    return Annotated[str, StringConstraints(min_length=min_length, max_length=max_length), *checks]


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
        unknown = given - {"name", "temperature", "seed"} - SAMPLER_ARGUMENTS[self.name]
        if unknown:
            raise ValueError(f"sampler {self.name!r} takes no {', '.join(sorted(unknown))}")
        return self


def job_request(limits: Limits) -> Any:
    """The POST /v1/jobs body, a generate or a fit job told apart by `kind`, with this deployment's limits."""
    Prompt = text(limits.prompt_chars)
    CustomId = text(256, min_length=0, label=True)
    PresetHandle = text(512, label=True)

    class GenerateInput(Strict):
        """A prompt, or `encoder_text` for a sequence-to-sequence model."""

        custom_id: CustomId | None = None
        prompt: Prompt | None = None
        encoder_text: Prompt | None = None

        @model_validator(mode="after")
        def one_text(self):
            if (self.prompt is None) == (self.encoder_text is None):
                raise ValueError("give exactly one of prompt and encoder_text")
            return self

    class GenerateParams(Strict):
        max_length: int | None = Field(None, ge=1, le=limits.max_length)
        max_new_tokens: int | None = Field(None, ge=1, le=limits.max_new_tokens)
        sampler: SamplerName | SamplerConfig = "greedy"
        seed: int | None = Field(None, ge=0, le=MAX_SEED)
        stop_token_ids: Literal["auto"] | list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] | None = Field(
            "auto", max_length=64
        )
        stop: list[text(256)] | None = Field(None, max_length=16)
        strip_prompt: bool = False
        dtype: Dtype | None = None
        micro_batch_size: int | None = Field(None, ge=1, le=limits.batch_size)

    class GenerateJobRequest(Strict):
        kind: Literal["generate"]
        preset: PresetHandle
        inputs: list[GenerateInput] = Field(min_length=1, max_length=limits.inputs_per_job)
        params: GenerateParams = Field(default_factory=GenerateParams)

    class TrainingExample(Strict):
        """A text, or an `encoder_text`/`decoder_text` pair for a sequence-to-sequence model."""

        text: Prompt | None = None
        encoder_text: Prompt | None = None
        decoder_text: Prompt | None = None

        @model_validator(mode="after")
        def one_kind(self):
            pair = (self.encoder_text is not None, self.decoder_text is not None)
            if (self.text is not None) == any(pair) or (any(pair) and not all(pair)):
                raise ValueError("give either text, or both encoder_text and decoder_text")
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
        output_preset: str = Field(pattern=PRESET_NAME_PATTERN, description="the store name of the result")

    return Union[GenerateJobRequest, FitJobRequest]


def job_params(model: BaseModel) -> dict:
    """Parameters as the job runner reads them: no nulls, samplers as plain JSON."""
    return model.model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------- responses


class Counts(BaseModel):
    total: int
    completed: int
    failed: int


class JobOut(BaseModel):
    id: str
    kind: Literal["generate", "fit"]
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
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
    name: str
    architecture: str | None
    builtin: bool = False
    path: str | None = None
    handle: str | None = None
    source: str | None = None
    parent: str | None = None
    job_id: str | None = None
    description: str | None = None
    details: dict = Field(default_factory=dict)
    created_at: str | None = None


class PresetList(BaseModel):
    presets: list[PresetOut]


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
