"""The homeserver's client-server API as the relay's bot uses it (JSON calls, not media).

Media downloads are streamed by :mod:`relay.upstream.fetcher`; this module covers start-up
checks (``/versions``, ``whoami``, bot registration), room membership and ping.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)

JSON_LIMIT = 1024 * 1024  # a JSON answer larger than this is not one we asked for


class HomeserverUnreachable(Exception):
    """No HTTP answer at all (connection refused, DNS, TLS, timeout)."""


class HomeserverError(Exception):
    """The homeserver answered with an error status."""

    def __init__(self, status: int, errcode: str | None, message: str) -> None:
        super().__init__(f"{status} {errcode or ''} {message}".strip())
        self.status = status
        self.errcode = errcode
        self.message = message


def path(*segments: str) -> str:
    """Join path segments, each percent-encoded so no input can add a segment."""
    return "/" + "/".join(quote(s, safe="") for s in segments)


class HomeserverClient:
    def __init__(
        self, session: aiohttp.ClientSession, address: str, as_token: str, timeout: float = 30
    ) -> None:
        self.session = session
        self.address = address.rstrip("/")
        self._as_token = as_token
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def request(
        self,
        method: str,
        url_path: str,
        body: Mapping[str, Any] | None = None,
        *,
        authenticated: bool = True,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._as_token}"} if authenticated else {}
        try:
            async with self.session.request(
                method,
                self.address + url_path,
                json=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(JSON_LIMIT)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise HomeserverUnreachable(f"{self.address}: {type(e).__name__}: {e}") from e
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if status >= 400:
            raise HomeserverError(
                status,
                data.get("errcode"),
                str(data.get("error") or raw[:200].decode(errors="replace")),
            )
        return data

    async def versions(self) -> dict[str, Any]:
        return await self.request("GET", "/_matrix/client/versions", authenticated=False)

    async def whoami(self) -> str:
        data = await self.request("GET", "/_matrix/client/v3/account/whoami")
        user_id = data.get("user_id")
        if not isinstance(user_id, str):
            raise HomeserverError(200, None, "whoami answered without a user_id")
        return user_id

    async def register_appservice_user(self, localpart: str) -> None:
        """Register the bot (spec: appservice "Server admin style permissions")."""
        try:
            await self.request(
                "POST",
                "/_matrix/client/v3/register",
                {
                    "type": "m.login.application_service",
                    "username": localpart,
                    "inhibit_login": True,
                },
            )
        except HomeserverError as e:
            if e.errcode != "M_USER_IN_USE":
                raise

    async def ensure_bot(self, localpart: str, expected_user_id: str) -> None:
        """Check the as_token acts as the bot; register the bot if the server does not know it."""
        try:
            user_id = await self.whoami()
        except HomeserverError as e:
            if e.status not in (401, 403) or e.errcode == "M_UNKNOWN_TOKEN":
                raise
            log.info("bot user not known to the homeserver yet (%s); registering it", e.errcode)
            await self.register_appservice_user(localpart)
            user_id = await self.whoami()
        if user_id != expected_user_id:
            raise HomeserverError(
                200, None, f"as_token belongs to {user_id}, expected {expected_user_id}"
            )

    async def join_room(self, room_id: str) -> None:
        await self.request("POST", path("_matrix", "client", "v3", "rooms", room_id, "join"), {})

    async def leave_room(self, room_id: str) -> None:
        await self.request("POST", path("_matrix", "client", "v3", "rooms", room_id, "leave"), {})

    async def ping_appservice(self, appservice_id: str) -> dict[str, Any]:
        """Ask the homeserver to call our ``/_matrix/app/v1/ping`` (spec: appservice ping, v1.7)."""
        return await self.request(
            "POST", path("_matrix", "client", "v1", "appservice", appservice_id, "ping"), {}
        )
