"""Why media could not be had from the homeserver, and what clients are told.

Status mapping (what the serving side answers):

======================  =====================  ==================================
upstream                exception              relay answers
======================  =====================  ==================================
404                     UpstreamNotFound       404 ``M_NOT_FOUND`` (remembered)
413, over max_size      UpstreamTooLarge       502 ``M_TOO_LARGE``
429                     UpstreamRateLimited    503 ``M_LIMIT_EXCEEDED`` + Retry-After
401, 403                UpstreamUnauthorized   502 ``M_UNKNOWN`` + Retry-After
504, timeouts           UpstreamError(504)     504 ``M_UNKNOWN`` + Retry-After
anything else           UpstreamError(502)     502 ``M_UNKNOWN`` + Retry-After
======================  =====================  ==================================

429 maps to 503 rather than 502: the homeserver is fine, the relay is asked to slow
down, and 503 is the status whose Retry-After clients honour (RFC 9110 §15.6.4).
"""

from __future__ import annotations

from relay.core.errors import Codes, MatrixError

DEFAULT_RETRY_AFTER = 10

# The outcomes counted in ``relay_upstream_requests{outcome}``.
OUTCOMES = (
    "ok",
    "not_found",
    "too_large",
    "rate_limited",
    "unauthorized",
    "upstream_error",
    "timeout",
)


class FetchError(Exception):
    """Base of every failure to provide media; ``to_matrix_error()`` is what clients see."""

    status = 502

    def to_matrix_error(self) -> MatrixError:
        return MatrixError(self.status, Codes.UNKNOWN, "The media could not be fetched")


class UpstreamNotFound(FetchError):
    """The homeserver answered 404: the media does not exist (or is not visible to us)."""

    status = 404

    def to_matrix_error(self) -> MatrixError:
        return MatrixError(404, Codes.NOT_FOUND, "Media not found")


class UpstreamTooLarge(FetchError):
    """The media is larger than ``media.max_size`` (by Content-Length or counted)."""

    status = 502

    def to_matrix_error(self) -> MatrixError:
        return MatrixError(502, Codes.TOO_LARGE, "Media is larger than this relay serves")


class UpstreamError(FetchError):
    """The homeserver failed or timed out; ``status`` is 502 or 504, worth retrying later."""

    errcode: str = Codes.UNKNOWN

    def __init__(self, message: str, *, status: int = 502, retry_after: int = DEFAULT_RETRY_AFTER):
        super().__init__(message)
        self.status = status
        self.retry_after = max(1, retry_after)

    def to_matrix_error(self) -> MatrixError:
        return MatrixError(
            self.status,
            self.errcode,
            "The homeserver could not provide this media right now",
            {"Retry-After": str(self.retry_after)},
        )


class UpstreamRateLimited(UpstreamError):
    """The homeserver answered 429; ``status`` is 503 and ``retry_after`` its back-off."""

    errcode = Codes.LIMIT_EXCEEDED

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, status=503, retry_after=retry_after)


class UpstreamUnauthorized(UpstreamError):
    """The homeserver refused our as_token (401/403): the relay's identity is broken."""

    def __init__(self, message: str, *, retry_after: int = 60) -> None:
        super().__init__(message, status=502, retry_after=retry_after)
