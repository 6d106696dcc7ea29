"""Bearer tokens on the internal listener, always compared in constant time."""

from __future__ import annotations

import hmac

from aiohttp import web

from relay.core.errors import Codes, MatrixError


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""  # present but unusable: treated as a wrong token
    return token.strip()


def check_token(request: web.Request, expected: str) -> None:
    """Header and deprecated ``access_token`` query parameter; both must match if both are sent.

    Missing → 401 M_MISSING_TOKEN, wrong → 403 M_FORBIDDEN (spec: "Authorization").
    Every comparison is constant-time.
    """
    candidates = [
        t for t in (bearer_token(request), request.query.get("access_token")) if t is not None
    ]
    if not candidates:
        raise MatrixError(401, Codes.MISSING_TOKEN, "Missing hs_token")
    ok = True
    for token in candidates:
        ok &= hmac.compare_digest(token.encode(), expected.encode())
    if not ok:
        raise MatrixError(403, Codes.FORBIDDEN, "Invalid hs_token")
