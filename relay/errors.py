"""One error family for the whole relay, rendered as Matrix-style JSON.

Core code raises :class:`MatrixError`; :func:`error_middleware` turns it (and
aiohttp's own routing errors) into ``{"errcode": "M_…", "error": "…"}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from enum import StrEnum

from aiohttp import web

log = logging.getLogger(__name__)


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

    def to_response(self, *, head: bool = False) -> web.Response:
        body = json.dumps({"errcode": self.errcode, "error": self.message})
        return web.Response(
            status=self.status,
            body=None if head else body.encode(),
            content_type="application/json",
            headers=self.headers,
        )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as Matrix JSON; never let one request crash the process."""
    head = request.method == "HEAD"
    try:
        return await handler(request)
    except MatrixError as e:
        return e.to_response(head=head)
    except web.HTTPMethodNotAllowed:
        return MatrixError(405, Codes.UNRECOGNIZED, "Method not allowed").to_response(head=head)
    except web.HTTPNotFound:
        return MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request").to_response(head=head)
    except web.HTTPRequestEntityTooLarge:
        return MatrixError(413, Codes.TOO_LARGE, "Request body too large").to_response(head=head)
    except web.HTTPException as e:
        # Anything aiohttp raised by itself keeps its status but gets our body shape.
        if e.status < 400:
            raise
        return MatrixError(e.status, Codes.UNKNOWN, e.reason).to_response(head=head)
    except (ConnectionResetError, TimeoutError) as e:
        # The client went away; nothing to answer.
        log.debug("client connection lost during %s %s: %s", request.method, request.path, e)
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return MatrixError(500, Codes.UNKNOWN, "Internal server error").to_response(head=head)
