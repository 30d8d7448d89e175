"""A structured output's form (``response_format``), checked by the grammar engine (lmq.core.grammar).

Apart from the job models (lmq.core.domain.generation), because the model library checks a
``generate(..., response_format=...)`` with it too, and the library reads no settings: this
module imports pydantic and lmq.core.names' fields only.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Required, TypedDict

from lmq.core.domain.fields import Strict, text

MAX_PATTERN_CHARS = 10_000  # a regex or one choice


class JsonSchemaFormat(TypedDict, total=False):
    """OpenAI's `response_format.json_schema` (the key `schema` is why this is a TypedDict, not a model)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: Required[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]]
    description: text(4096, min_length=0)
    schema: Required[dict[str, Any]]
    strict: bool | None


class ResponseFormat(Strict):
    """A structured output (lmq.core.grammar): OpenAI's `text`, `json_object` and `json_schema`, and
    vLLM's `regex` and `choice` (one of the strings). A format the grammar engine cannot compile
    is refused here, naming what it cannot compile."""

    type: Literal["text", "json_object", "json_schema", "regex", "choice"]
    json_schema: JsonSchemaFormat | None = None
    regex: text(MAX_PATTERN_CHARS) | None = None
    choice: list[text(MAX_PATTERN_CHARS)] | None = Field(None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def compiles(self):
        wanted = {"json_schema": "json_schema", "regex": "regex", "choice": "choice"}.get(self.type)
        given = [name for name in ("json_schema", "regex", "choice") if getattr(self, name) is not None]
        if given != ([wanted] if wanted else []):
            raise PydanticCustomError(
                "response_format", "type '{type}' takes {wanted}", {"type": self.type, "wanted": repr(wanted) if wanted else "no other field"}
            )
        compiled_format(self.model_dump(exclude_none=True))
        return self


def compiled_format(response_format: dict) -> dict:
    """``response_format`` when the grammar engine compiles it, else a validation error naming what it cannot."""
    from lmq.core.grammar import format_grammar  # llguidance: once a format is given

    try:
        format_grammar(response_format)
    except ValueError as error:
        raise PydanticCustomError("response_format", "{problem}", {"problem": str(error)}) from None
    return response_format
