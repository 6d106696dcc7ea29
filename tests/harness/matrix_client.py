"""A tiny Matrix client-server API helper for tests.

Deliberately independent of mautrix and of the relay's code, so a bug there cannot
hide itself in the test setup. Every method raises :class:`MatrixRequestError`
(with the status and body) when the homeserver does not answer 200.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDictProxy

CLIENT_V3 = "/_matrix/client/v3"
CLIENT_V1_MEDIA = "/_matrix/client/v1/media"
MEDIA_V3 = "/_matrix/media/v3"


class MatrixRequestError(Exception):
    """The homeserver answered a request with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body

    @property
    def errcode(self) -> str | None:
        """The Matrix ``errcode`` of a JSON error body, if there is one."""
        try:
            parsed = json.loads(self.body)
        except ValueError:
            return None
        errcode = parsed.get("errcode") if isinstance(parsed, dict) else None
        return errcode if isinstance(errcode, str) else None


def seg(value: str) -> str:
    """Quote one path segment (room ids carry ``!``/``:``, event ids ``$``)."""
    return quote(value, safe="")


def new_txn_id() -> str:
    """A transaction id unique per call (client-server API "Transaction identifiers")."""
    return uuid.uuid4().hex


def image_content(
    mxc: str,
    body: str = "image.png",
    mimetype: str = "image/png",
    size: int | None = None,
    width: int | None = None,
    height: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An ``m.image`` message content (spec: "m.image" msgtype)."""
    info: dict[str, Any] = {"mimetype": mimetype}
    if size is not None:
        info["size"] = size
    if width is not None:
        info["w"] = width
    if height is not None:
        info["h"] = height
    return {"msgtype": "m.image", "body": body, "url": mxc, "info": info, **extra}


@dataclass
class MatrixUser:
    """One logged-in Matrix identity (a user's or an appservice's access token)."""

    base_url: str
    user_id: str
    access_token: str
    session: aiohttp.ClientSession

    @property
    def localpart(self) -> str:
        return self.user_id[1:].split(":", 1)[0]

    @property
    def server_name(self) -> str:
        return self.user_id.split(":", 1)[1]

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.access_token}"}
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | None = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send an authenticated request; return the JSON body of a 200 answer."""
        async with self.session.request(
            method,
            self.base_url + path,
            json=json,
            data=data,
            params=params,
            headers=self._headers(headers),
        ) as response:
            text = await response.text()
            if response.status != 200:
                raise MatrixRequestError(method, path, response.status, text)
            body = await response.json(content_type=None)
        if not isinstance(body, dict):
            raise MatrixRequestError(method, path, response.status, f"not a JSON object: {text}")
        return body

    async def whoami(self) -> str:
        """The user id the homeserver sees behind this token."""
        body = await self.request("GET", f"{CLIENT_V3}/account/whoami")
        return str(body["user_id"])

    async def create_room(self, invite: list[str] | None = None, **extra: Any) -> str:
        """Create a room (extra keys go into the createRoom body); return its id."""
        payload: dict[str, Any] = {"invite": list(invite or []), **extra}
        body = await self.request("POST", f"{CLIENT_V3}/createRoom", json=payload)
        return str(body["room_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request(
            "POST", f"{CLIENT_V3}/rooms/{seg(room_id)}/invite", json={"user_id": user_id}
        )

    async def join(self, room_id: str) -> str:
        body = await self.request("POST", f"{CLIENT_V3}/join/{seg(room_id)}", json={})
        return str(body["room_id"])

    async def leave(self, room_id: str) -> None:
        await self.request("POST", f"{CLIENT_V3}/rooms/{seg(room_id)}/leave", json={})

    async def kick(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        await self._membership_action(room_id, "kick", user_id, reason)

    async def ban(self, room_id: str, user_id: str, reason: str | None = None) -> None:
        await self._membership_action(room_id, "ban", user_id, reason)

    async def _membership_action(
        self, room_id: str, action: str, user_id: str, reason: str | None
    ) -> None:
        payload = {"user_id": user_id}
        if reason is not None:
            payload["reason"] = reason
        await self.request("POST", f"{CLIENT_V3}/rooms/{seg(room_id)}/{action}", json=payload)

    async def upload(self, data: bytes, content_type: str, filename: str | None = None) -> str:
        """Upload bytes (``POST /_matrix/media/v3/upload``); return the ``mxc://`` URI."""
        params = {"filename": filename} if filename is not None else None
        body = await self.request(
            "POST",
            f"{MEDIA_V3}/upload",
            # A file object, not bytes: aiohttp warns about large in-memory bodies.
            data=io.BytesIO(data),
            params=params,
            headers={"Content-Type": content_type},
        )
        return str(body["content_uri"])

    async def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        """Send a timeline event; return its event id."""
        path = f"{CLIENT_V3}/rooms/{seg(room_id)}/send/{seg(event_type)}/{new_txn_id()}"
        body = await self.request("PUT", path, json=content)
        return str(body["event_id"])

    async def send_message(self, room_id: str, content: dict[str, Any]) -> str:
        return await self.send_event(room_id, "m.room.message", content)

    async def send_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        """Send a state event; return its event id."""
        path = f"{CLIENT_V3}/rooms/{seg(room_id)}/state/{seg(event_type)}/{seg(state_key)}"
        body = await self.request("PUT", path, json=content)
        return str(body["event_id"])

    async def redact(self, room_id: str, event_id: str, reason: str | None = None) -> str:
        """Redact an event; return the redaction's event id."""
        path = f"{CLIENT_V3}/rooms/{seg(room_id)}/redact/{seg(event_id)}/{new_txn_id()}"
        body = await self.request("PUT", path, json={} if reason is None else {"reason": reason})
        return str(body["event_id"])

    async def get_event(self, room_id: str, event_id: str) -> dict[str, Any]:
        return await self.request("GET", f"{CLIENT_V3}/rooms/{seg(room_id)}/event/{seg(event_id)}")

    async def set_displayname(self, name: str) -> None:
        await self.request(
            "PUT",
            f"{CLIENT_V3}/profile/{seg(self.user_id)}/displayname",
            json={"displayname": name},
        )

    async def set_avatar_url(self, mxc: str) -> None:
        await self.request(
            "PUT", f"{CLIENT_V3}/profile/{seg(self.user_id)}/avatar_url", json={"avatar_url": mxc}
        )

    async def _get_raw(
        self, path: str, params: Mapping[str, str] | None, authenticated: bool
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        headers = self._headers() if authenticated else {}
        async with self.session.get(self.base_url + path, params=params, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()

    async def download_authenticated(
        self,
        server_name: str,
        media_id: str,
        filename: str | None = None,
        authenticated: bool = True,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """``GET /_matrix/client/v1/media/download/...`` (Matrix 1.11); never raises on status."""
        path = f"{CLIENT_V1_MEDIA}/download/{seg(server_name)}/{seg(media_id)}"
        if filename is not None:
            path += "/" + seg(filename)
        return await self._get_raw(path, None, authenticated)

    async def thumbnail_authenticated(
        self,
        server_name: str,
        media_id: str,
        width: int,
        height: int,
        method: str = "scale",
        authenticated: bool = True,
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """``GET /_matrix/client/v1/media/thumbnail/...``; never raises on status."""
        path = f"{CLIENT_V1_MEDIA}/thumbnail/{seg(server_name)}/{seg(media_id)}"
        params = {"width": str(width), "height": str(height), "method": method}
        return await self._get_raw(path, params, authenticated)

    async def download_legacy(
        self, server_name: str, media_id: str
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """The unauthenticated, frozen ``/_matrix/media/v3/download`` path; never raises."""
        path = f"{MEDIA_V3}/download/{seg(server_name)}/{seg(media_id)}"
        return await self._get_raw(path, None, authenticated=False)
