"""The field types request models are built from: strict objects, text with limits, store labels."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from lmq.core.names import DTYPES, PRESET_NAME_PATTERN, SAMPLER_NAMES, check_preset_name

SamplerName = Literal[SAMPLER_NAMES]
Dtype = Literal[DTYPES]
MAX_SEED = 2**31 - 1
MAX_TOKEN_ID = 2**31 - 1


class Strict(BaseModel):
    """Unknown fields are refused: a misspelt parameter in a job of a million prompts fails at once."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


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
