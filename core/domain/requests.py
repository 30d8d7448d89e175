"""The one job request model (POST /v1/jobs, `lmq generate|fit|submit`), and how its problems are named.

Request models are built from the settings' limits (`job_request`), so the
limits show in the OpenAPI document and every bad body is a 422 that names
its field. The CLI builds the same body from its flags and files and checks
it through the same model (`parse_job`), so `lmq generate` refuses exactly
what the server refuses, before any model loads.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

from lmq.core.config import Limits
from lmq.core.domain.fields import PresetName, Strict, text
from lmq.core.domain.fit import fit_models
from lmq.core.domain.generation import SAMPLER_BY_NAME, SAMPLER_WITH_ARGUMENTS, generate_models
from lmq.core.names import JobKind

# The branch tags pydantic puts into an error's location; field names leave them out.
UNION_TAGS = (JobKind.generate.value, JobKind.fit.value, SAMPLER_BY_NAME, SAMPLER_WITH_ARGUMENTS)


@lru_cache
def job_request(limits: Limits) -> Any:
    """The POST /v1/jobs body, a generate or a fit job told apart by `kind`, with this deployment's limits."""
    PresetHandle = text(512, label=True)
    generate, fit = generate_models(limits), fit_models(limits)

    class GenerateJobRequest(Strict):
        kind: Literal["generate"]
        preset: PresetHandle
        inputs: list[generate.item] = Field(min_length=1, max_length=limits.inputs_per_job)
        params: generate.job_params = Field(default_factory=generate.job_params)

    class FitJobRequest(Strict):
        kind: Literal["fit"]
        preset: PresetHandle
        training_data: list[fit.example] = Field(min_length=1, max_length=limits.inputs_per_job)
        validation_data: list[fit.example] | None = Field(None, max_length=limits.inputs_per_job)
        hyperparameters: fit.hyperparameters = Field(default_factory=fit.hyperparameters)
        output_preset: PresetName = Field(description="the store name of the result")

    return Union[GenerateJobRequest, FitJobRequest]


@lru_cache
def _job_adapter(limits: Limits) -> TypeAdapter:
    return TypeAdapter(Annotated[job_request(limits), Field(discriminator="kind")])


def parse_job(body: dict, limits: Limits) -> BaseModel:
    """The job request a body describes, or pydantic's ValidationError (see `problems`)."""
    return _job_adapter(limits).validate_python(body)


def job_params(model: BaseModel) -> dict:
    """Parameters as the job runner reads them: no nulls, samplers as plain JSON."""
    return model.model_dump(mode="json", exclude_none=True)


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
