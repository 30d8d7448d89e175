"""One line of a Batch API input file, as an lmq generate input.

A line is `{"custom_id", "method": "POST", "url", "body"}`; its body is what
the same request to /v1/completions or /v1/chat/completions would carry.
`parse_line` turns it into a generate item (`{"prompt"}` or `{"messages"}`,
with the line's own `params`), checked by the model every generate item is
checked by (lmq.core.domain.generation), or raises LineError saying what is
wrong with it: a bad line is that line's error, not the batch's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lmq.core.config import Limits
from lmq.core.domain.fields import MAX_SEED, Strict, text
from lmq.core.domain.formats import MAX_PATTERN_CHARS, ResponseFormat, compiled_format
from lmq.core.domain.generation import MAX_CHOICES, MAX_TOP_LOGPROBS, LogitBias, Penalty, generate_models
from lmq.core.domain.requests import field_name, problems
from lmq.core.store.batch_files import CHAT, COMPLETIONS
from lmq.core.utf8 import utf8_text

ENDPOINTS = (COMPLETIONS, CHAT)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat runs to the end of the turn
CUSTOM_ID = TypeAdapter(text(256, label=True))
# vLLM's structured-output fields, each one way to ask for a response format (lmq.core.grammar).
STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "structured_outputs")


def schema_format(schema: dict | str) -> dict:
    """vLLM's `json` (a JSON schema, or its text) as lmq's response format."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise PydanticCustomError("json_schema", "is not JSON: {error}", {"error": str(error)}) from None
    if not isinstance(schema, dict):
        raise PydanticCustomError("json_schema", "must be a JSON schema (an object)")
    return compiled_format({"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}})


Schema = Annotated[Union[dict[str, Any], text(2**20)], AfterValidator(schema_format)]
Regex = Annotated[text(MAX_PATTERN_CHARS), AfterValidator(lambda regex: compiled_format({"type": "regex", "regex": regex}))]
Choice = Annotated[
    list[text(MAX_PATTERN_CHARS)],
    Field(min_length=1, max_length=1024),
    AfterValidator(lambda choice: compiled_format({"type": "choice", "choice": choice})),
]


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: one of `json`, `regex`, `choice`, `json_object` (lmq has no
    `grammar`, `structural_tag` nor whitespace options: unknown fields)."""

    json_: Schema | None = Field(None, alias="json")
    regex: Regex | None = None
    choice: Choice | None = None
    json_object: Literal[True] | None = None

    @model_validator(mode="after")
    def one_kind(self):
        given = [f for f in (self.json_, self.regex, self.choice) if f is not None]
        given += [{"type": "json_object"}] if self.json_object else []
        if len(given) != 1:
            raise PydanticCustomError("structured_outputs", "give one of json, regex, choice or json_object")
        return self

    @property
    def format(self) -> dict:
        return next(f for f in (self.json_, self.regex, self.choice, {"type": "json_object"}) if f is not None)


class ChatResponseFormat(ResponseFormat):
    """OpenAI's `response_format` on chat lines."""

    type: Literal["text", "json_object", "json_schema"]


class LineError(ValueError):
    """What is wrong with one line: an OpenAI-style code and a message naming the line."""

    def __init__(self, code: str, message: str, custom_id: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id, self.param = code, message, custom_id, param


@dataclass(frozen=True)
class Request:
    custom_id: str
    model: str
    input: dict


def max_line_bytes(limits: Limits) -> int:
    """A line may hold a conversation of several prompts' worth of text, as UTF-8 and JSON-escaped."""
    return max(2**20, 8 * limits.prompt_chars)


def read_lines(path: Path, limits: Limits) -> Iterator[tuple[int, bytes | LineError]]:
    """(line number, its bytes) for each line that is not blank, read one at a time; an over-long line
    is skipped to its end and comes as a LineError. A line that is not UTF-8 is NotUtf8: the file as a
    whole is refused, so that no line of a UTF-16 file (whose next lines json.loads would take) runs."""
    longest = max_line_bytes(limits)
    with path.open("rb") as source:
        number = 0
        while line := source.readline(longest + 1):
            number += 1
            if len(line) > longest and not line.endswith(b"\n"):
                while (rest := source.readline(2**16)) and not rest.endswith(b"\n"):
                    pass
                yield number, LineError("line_too_long", f"line {number} is longer than {longest} bytes")
            elif line.strip():
                utf8_text(line, f"line {number} of the input file")
                yield number, line


@lru_cache
def body_models(limits: Limits) -> dict[str, type[Strict]]:
    """The body each endpoint takes: the OpenAI request fields lmq honours, with this deployment's limits."""
    Stop = Union[text(256), Annotated[list[text(256)], Field(min_length=1, max_length=4)]]
    NewTokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)]

    class Body(Strict):
        model: text(512, label=True)
        max_tokens: NewTokens | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        stop: Stop | None = None
        seed: int | None = Field(None, ge=0, le=MAX_SEED)
        n: int | None = Field(None, ge=1, le=MAX_CHOICES)
        presence_penalty: Penalty | None = None
        frequency_penalty: Penalty | None = None
        logit_bias: LogitBias | None = Field(None, max_length=1024)
        min_p: float | None = Field(None, ge=0, le=1)  # vLLM's
        # vLLM's structured outputs (the guided_* fields are its older names).
        guided_json: Schema | None = None
        guided_regex: Regex | None = None
        guided_choice: Choice | None = None
        structured_outputs: StructuredOutputs | None = None
        # Accepted at the value that asks for nothing lmq lacks.
        stream: Literal[False] | None = None
        user: text(256, min_length=0) | None = None

        @model_validator(mode="after")
        def one_structure(self):
            given = [name for name in STRUCTURED_FIELDS if getattr(self, name, None) is not None]
            if len(given) > 1:
                raise PydanticCustomError("structured_output", "give one of {given}, not several", {"given": ", ".join(given)})
            return self

    class CompletionBody(Body):
        prompt: Union[
            text(limits.prompt_chars), Annotated[list[text(limits.prompt_chars)], Field(min_length=1, max_length=1)]
        ]
        logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # OpenAI's top tokens per token (vLLM: to 20)

    class TextPart(Strict):
        type: Literal["text"]
        text: text(limits.prompt_chars, min_length=0)

    class Message(Strict):
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[text(limits.prompt_chars, min_length=0), list[TextPart]]
        name: text(64) | None = None

    class ChatBody(Body):
        messages: list[Message] = Field(min_length=1, max_length=1024)
        max_completion_tokens: NewTokens | None = None
        logprobs: bool | None = None
        top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
        response_format: ChatResponseFormat | None = None

        @model_validator(mode="after")
        def top_logprobs_need_logprobs(self):
            if self.top_logprobs is not None and not self.logprobs:
                raise PydanticCustomError("top_logprobs", "top_logprobs needs logprobs: true")
            return self

    return {COMPLETIONS: CompletionBody, CHAT: ChatBody}


def parse_line(raw: bytes, number: int, endpoint: str, limits: Limits) -> Request:
    """The request on line `number` of a batch for `endpoint`; LineError when it cannot run."""
    try:
        line = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LineError("invalid_json", f"line {number} is not JSON: {error}") from None
    if not isinstance(line, dict):
        raise LineError("invalid_json", f"line {number} is a JSON {type(line).__name__}, not an object")
    custom_id = line.get("custom_id")
    try:
        CUSTOM_ID.validate_python(custom_id)
    except ValidationError:
        raise LineError(
            "invalid_request", f"line {number}: custom_id must be a string of 1 to 256 characters", param="custom_id"
        ) from None
    unknown = sorted(set(line) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError("invalid_request", f"line {number}: unknown field {unknown[0]!r}", custom_id, unknown[0])
    if line.get("method", "POST") != "POST":
        raise LineError("invalid_request", f"line {number}: method must be 'POST'", custom_id, "method")
    if line.get("url") not in ENDPOINTS:
        raise LineError(
            "unsupported_endpoint",
            f"line {number}: url {line.get('url')!r} is not supported: lmq runs {' and '.join(ENDPOINTS)} requests",
            custom_id,
            "url",
        )
    if line.get("url") != endpoint:
        raise LineError(
            "invalid_url",
            f"line {number}: url {line.get('url')!r} is not this batch's endpoint {endpoint!r}",
            custom_id,
            "url",
        )
    if not isinstance(line.get("body"), dict):
        raise LineError("invalid_request", f"line {number}: body must be a JSON object", custom_id, "body")
    try:
        body = body_models(limits)[endpoint].model_validate(line["body"])
        item = generate_models(limits).item.model_validate({"custom_id": custom_id, **item_input(body, endpoint)})
    except ValidationError as error:
        found = problems(error.errors())[0]
        param = ".".join(filter(None, ("body", field_name(found["loc"]))))
        raise LineError("invalid_request", f"line {number}: {param}: {found['msg']}", custom_id, param) from None
    return Request(custom_id, body.model, item.stored_input())


def item_input(body, endpoint: str) -> dict:
    """The generate item the line asks for: the text to continue (a prompt, or messages the runner
    renders with the preset's chat template) and this line's own generation settings."""
    params = {"sampler": sampler(body.temperature, body.top_p)}
    if endpoint == COMPLETIONS:
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        source = {"prompt": prompt}
        params["max_new_tokens"] = body.max_tokens or COMPLETION_MAX_TOKENS
    else:
        source = {"messages": [message_of(m) for m in body.messages]}
        if (max_tokens := body.max_completion_tokens or body.max_tokens) is not None:
            params["max_new_tokens"] = max_tokens
    if body.stop is not None:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if body.seed is not None:
        params["seed"] = body.seed
    for name in ("n", "presence_penalty", "frequency_penalty", "logit_bias", "min_p"):
        if getattr(body, name) is not None:
            params[name] = getattr(body, name)
    if endpoint == COMPLETIONS and body.logprobs is not None:
        params["logprobs"] = body.logprobs
    elif endpoint == CHAT and body.logprobs:
        params["logprobs"] = body.top_logprobs or 0
    if (response_format := structured_output(body)) is not None:
        params["response_format"] = response_format
    return {**source, "params": params}


def structured_output(body) -> dict | None:
    """The response format the line asks for, by whichever field (None: free text)."""
    if getattr(body, "response_format", None) is not None and body.response_format.type != "text":
        return body.response_format.model_dump(mode="json", exclude_none=True)
    if body.structured_outputs is not None:
        return body.structured_outputs.format
    return body.guided_json or body.guided_regex or body.guided_choice


def sampler(temperature: float | None, top_p: float | None):
    """OpenAI's sampling settings as an lmq sampler: temperature 0 is greedy; the defaults
    (temperature 1, top_p 1) sample from the whole distribution."""
    if temperature == 0:
        return "greedy"
    temperature = 1.0 if temperature is None else temperature
    if top_p is not None and top_p < 1:
        return {"name": "top_p", "p": top_p, "temperature": temperature}
    return {"name": "random", "temperature": temperature}


def message_of(message) -> dict:
    """`developer` is OpenAI's newer name for `system`; text parts are joined."""
    content = message.content if isinstance(message.content, str) else "".join(part.text for part in message.content)
    return {"role": "system" if message.role == "developer" else message.role, "content": content}
