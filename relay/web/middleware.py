"""The error middleware: every failure leaves as Matrix JSON, never as a crash."""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from relay.core.errors import Codes, MatrixError

log = logging.getLogger(__name__)


def error_response(error: MatrixError, *, head: bool = False) -> web.Response:
    """``error`` as a response: ``{"errcode", "error"}`` with its status and headers."""
    return web.Response(
        status=error.status,
        body=None if head else json.dumps(error.to_json()).encode(),
        content_type="application/json",
        headers=error.headers,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The relay's own resources running out (descriptors, disk, quota, memory): nothing is
# wrong with the request, and it may well work in a moment (an eviction frees space, a
# stream ends and frees its descriptor), so 503 with Retry-After (RFC 9110 §15.6.4),
# never a 500 that says the relay is broken.
EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOSPC, errno.EDQUOT, errno.ENOMEM})
EXHAUSTED_RETRY_AFTER = 5


def exhausted(error: OSError) -> MatrixError | None:
    """The 503 for a local resource exhaustion, or None for any other OSError."""
    if error.errno not in EXHAUSTED_ERRNOS:
        return None
    return MatrixError(
        503,
        Codes.UNKNOWN,
        "The relay is short of local resources; try again shortly",
        {"Retry-After": str(EXHAUSTED_RETRY_AFTER)},
    )


def loggable_path(request: web.Request) -> str:
    """The request's route pattern, never its path: a public path is a signed link.

    ``/media/{token}/{filename}`` says which handler failed; the token itself is a
    capability that anyone reading the logs could use (issue 13, finding 10). The
    same on the internal listener, whose values (transaction ids) handlers log themselves.
    """
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "(no route)"
    return resource.canonical


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as Matrix JSON; never let one request crash the process."""
    try:
        return await handler(request)
    except Exception as e:
        return render_error(request, e)


def render_error(request: web.Request, error: Exception) -> web.Response:
    """The Matrix JSON answer to ``error`` raised by a handler (re-raised if there is none:
    the client went away, or aiohttp's own non-error answer such as a redirect)."""
    head = request.method == "HEAD"
    try:
        raise error
    except MatrixError as e:
        return error_response(e, head=head)
    except web.HTTPMethodNotAllowed as e:
        # RFC 9110 section 15.5.6: a 405 MUST carry Allow, listing the route's methods.
        allow = {"Allow": ", ".join(sorted(e.allowed_methods))}
        return error_response(
            MatrixError(405, Codes.UNRECOGNIZED, "Method not allowed", headers=allow), head=head
        )
    except web.HTTPNotFound:
        return error_response(
            MatrixError(404, Codes.UNRECOGNIZED, "Unrecognized request"), head=head
        )
    except web.HTTPRequestEntityTooLarge:
        return error_response(
            MatrixError(413, Codes.TOO_LARGE, "Request body too large"), head=head
        )
    except web.HTTPException as e:
        # Anything aiohttp raised by itself keeps its status but gets our body shape.
        if e.status < 400:
            raise
        return error_response(MatrixError(e.status, Codes.UNKNOWN, e.reason), head=head)
    except (ConnectionResetError, TimeoutError) as e:
        # The client went away; nothing to answer.
        log.debug(
            "client connection lost during %s %s: %s", request.method, loggable_path(request), e
        )
        raise
    except OSError as e:
        answer = exhausted(e)
        if answer is None:
            log.exception("unhandled error in %s %s", request.method, loggable_path(request))
            answer = MatrixError(500, Codes.UNKNOWN, "Internal server error")
        else:
            log.warning(
                "%s %s: %s (%s); answered 503",
                request.method,
                loggable_path(request),
                errno.errorcode.get(e.errno or 0, e.errno),
                e.strerror,
            )
        return error_response(answer, head=head)
    except Exception:
        log.exception("unhandled error in %s %s", request.method, loggable_path(request))
        return error_response(MatrixError(500, Codes.UNKNOWN, "Internal server error"), head=head)
