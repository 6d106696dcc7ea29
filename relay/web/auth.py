"""Bearer tokens on the internal listener, always compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

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


def token_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison that never raises.

    aiohttp decodes header bytes that are not UTF-8 into lone surrogates (and a query
    string may carry them too); such a token cannot equal a configured one, so it is
    simply wrong (403), never a crash (500) that logs a traceback per request.
    """
    try:
        candidate = presented.encode("utf-8")
    except UnicodeEncodeError:
        return False  # says nothing about the secret, so no need to spend constant time
    return hmac.compare_digest(candidate, expected.encode())


def matching_token(presented: str, expected: Iterable[str]) -> int | None:
    """Index of the configured token ``presented`` equals, or None.

    Every configured token is compared, so timing does not tell which one is close.
    """
    found: int | None = None
    for index, token in enumerate(expected):
        if token_matches(presented, token):
            found = index
    return found


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
        ok &= token_matches(token, expected)
    if not ok:
        raise MatrixError(403, Codes.FORBIDDEN, "Invalid hs_token")
