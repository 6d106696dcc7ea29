"""One error family for the whole relay, rendered as Matrix-style JSON.

Every layer raises :class:`MatrixError`; :mod:`relay.web.middleware` renders it (and
aiohttp's own routing errors) as ``{"errcode": "M_…", "error": "…"}``. No aiohttp
here, so the pure core can raise it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class Codes(StrEnum):
    """Matrix error codes (Client-Server API, "Standard error response")."""

    FORBIDDEN = "M_FORBIDDEN"
    MISSING_TOKEN = "M_MISSING_TOKEN"  # noqa: S105 - an error code, not a secret
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"  # noqa: S105 - an error code, not a secret
    NOT_FOUND = "M_NOT_FOUND"
    UNRECOGNIZED = "M_UNRECOGNIZED"
    NOT_JSON = "M_NOT_JSON"
    BAD_JSON = "M_BAD_JSON"
    TOO_LARGE = "M_TOO_LARGE"
    INVALID_PARAM = "M_INVALID_PARAM"
    MISSING_PARAM = "M_MISSING_PARAM"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    NOT_YET_UPLOADED = "M_NOT_YET_UPLOADED"
    UNKNOWN = "M_UNKNOWN"


class MatrixError(Exception):
    """An error with an HTTP status and a Matrix errcode, safe to show to the caller."""

    def __init__(
        self,
        status: int,
        errcode: Codes | str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = str(errcode)
        self.message = message
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, str]:
        return {"errcode": self.errcode, "error": self.message}
