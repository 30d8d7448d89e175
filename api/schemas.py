"""Response shapes of the HTTP API and the CLI: result and event lines, presets, listings.

The request models, and the job summary every front end shows, are the domain's
(lmq.core.domain); these are the other shapes the server answers with and the CLI prints.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field

from lmq.core.domain.jobs import JobSummary, isoformat
from lmq.core.store import JobEvent, JobItem, Preset


def jsonl(record: dict) -> str:
    """One line of a JSONL file or an NDJSON stream (results, listings): text kept as it is."""
    return json.dumps(record, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- responses: the models and the shapes
# The store hands back its records; these functions shape them into the
# contract's JSON (the models below describe the same shapes in OpenAPI).


def result_line(item: JobItem) -> dict:
    """One line of a generate job's results (`GET /v1/jobs/{id}/results`, `lmq generate -o`):
    `output` is the first choice's text; `choices` has every choice, with its log-probabilities,
    when the item asked for several (`n`) or for log-probabilities, and is null otherwise."""
    return {
        "index": item.index,
        "custom_id": item.custom_id,
        "output": item.output,
        "prompt_tokens": item.prompt_tokens,
        "completion_tokens": item.completion_tokens,
        "finish_reason": item.finish_reason,
        "error": item.error,
        "choices": item.details["choices"] if item.details else None,
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


class JobPage(BaseModel):
    jobs: list[JobSummary]
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
    storage: Check  # the object store of LMQ_STORAGE_URL
