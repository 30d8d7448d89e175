"""Bearer tokens and tenants.

Each token in LMQ_API_TOKENS ("token:tenant,...") belongs to a tenant, and a
tenant sees only its own jobs. With no tokens configured the server is a
single-user one (it binds to 127.0.0.1 only) and everyone is the local tenant,
the same tenant that `lmq generate` writes its jobs under.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

LOCAL_TENANT = "local"
# Documented in OpenAPI beside each route's own answers (FastAPI adds the 422 itself).
AUTH_ERRORS = {401: {"description": "a missing or unknown bearer token"}}

bearer = HTTPBearer(auto_error=False, description="a token from LMQ_API_TOKENS")


def tenant_for_token(tokens: dict[str, str], presented: str) -> str | None:
    """The presented token's tenant; every token is compared, in constant time."""
    tenant = None
    for token, owner in tokens.items():
        if hmac.compare_digest(token.encode(), presented.encode()):
            tenant = owner
    return tenant


def current_tenant(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> str:
    """The tenant a request acts for; 401 for a missing or unknown token."""
    tokens = request.app.state.settings.api_tokens
    if not tokens:
        return LOCAL_TENANT
    if credentials is None:
        raise unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    tenant = tenant_for_token(tokens, credentials.credentials)
    if tenant is None:
        raise unauthorized("invalid bearer token")
    return tenant


def unauthorized(message: str) -> HTTPException:
    return HTTPException(401, detail=message, headers={"WWW-Authenticate": "Bearer"})
