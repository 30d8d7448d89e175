"""What the OpenAI-compatible routes share: OpenAI's error body and its list pages.

OpenAI's clients read a refusal from `{"error": {"message", "type", "param",
"code"}}`, so these routes answer in that shape (OpenAIRoute) instead of the
`{"detail", "message"}` of /v1/jobs: a bad request is a 4xx that the
`openai` package raises as its own BadRequestError, NotFoundError, ...
"""

from __future__ import annotations

from datetime import datetime

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from lmq.core.domain.requests import field_name, problems

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error"}
OPENAI_ERRORS = {
    400: {"description": 'a bad request: `{"error": {"message", "type", "param", "code"}}`'},
    401: {"description": "a missing or unknown bearer token"},
}


class OpenAIError(Exception):
    """A refusal, as OpenAI words one: the HTTP status, a message, the parameter at fault and a code."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {
            "message": self.message,
            "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param,
            "code": self.code,
        }
        return JSONResponse(status_code=self.status, content={"error": body})


def not_found(kind: str, identifier: str, param: str | None = None) -> OpenAIError:
    """Another tenant's file or batch reads the same as one that never existed."""
    return OpenAIError(404, f"No such {kind}: {identifier!r}", param=param, code="not_found")


def validation_error(error: RequestValidationError) -> OpenAIError:
    """FastAPI's 422 as OpenAI's 400, naming the bad field (`metadata.k`, `limit`, ...) in `param`."""
    found = problems(error.errors())
    # ("body", "metadata", "k") -> "metadata.k"; a body that is not JSON at all, ("body", 0), is "body".
    names = [
        field_name(loc[1:]) if len(loc) > 1 and isinstance(loc[1], str) else str(loc[0])
        for loc in (problem["loc"] for problem in found)
    ]
    message = "; ".join(f"{name}: {problem['msg']}" for name, problem in zip(names, found[:10]))
    return OpenAIError(400, message or "invalid request", param=names[0] if names else None, code="invalid_request")


class OpenAIRoute(APIRoute):
    """A route whose refusals (including the auth dependency's 401 and FastAPI's own validation) are OpenAI-shaped."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def openai_shaped(request: Request):
            try:
                return await handler(request)
            except OpenAIError as error:
                return error.response()
            except RequestValidationError as error:
                return validation_error(error).response()
            except HTTPException as error:
                code = "invalid_api_key" if error.status_code == 401 else None
                refusal = OpenAIError(error.status_code, str(error.detail), code=code).response()
                refusal.headers.update(error.headers or {})
                return refusal

        return openai_shaped


def unix(moment: datetime | None) -> int | None:
    """OpenAI's timestamps are whole seconds since the epoch."""
    return None if moment is None else int(moment.timestamp())


def page(objects: list[dict], limit: int) -> dict:
    """OpenAI's list shape; `objects` holds one more than `limit` when there is a next page."""
    shown = objects[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(objects) > limit,
    }
