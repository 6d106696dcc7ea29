"""A real, throwaway Synapse homeserver on a loopback port.

Used by the integration tests and by ``media-relay demo``. Synapse runs as a
subprocess of the same interpreter (``python -m synapse.app.homeserver``); nothing
from Synapse is imported here, so the relay itself never depends on it.

The process is started with :class:`subprocess.Popen`, not asyncio's subprocess
API, so it belongs to no event loop: a synchronous test fixture can start it in one
loop and stop it in another.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
from ruamel.yaml import YAML

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STOP_GRACE_SECONDS = 10.0
_POLL_INTERVAL = 0.1
_LOG_TAIL_BYTES = 8000

# Limits high enough that no test or demo ever meets one; each rc_* section is
# parsed by synapse/config/ratelimiting.py as {per_second, burst_count}.
_UNLIMITED = {"per_second": 100000, "burst_count": 100000}
_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_third_party_invite": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
}


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is chosen, so the ports differ from
    each other; another process may still take one before it is used.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _signing_key_line() -> str:
    """A Synapse signing key file line: ``ed25519 <version> <unpadded base64 seed>``."""
    version = "a_" + secrets.token_hex(2)
    seed = base64.b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    return f"ed25519 {version} {seed}\n"


def registration_mac(
    shared_secret: str, nonce: str, username: str, password: str, admin: bool
) -> str:
    """HMAC-SHA1 for Synapse's shared-secret registration (docs: admin_api/register_api)."""
    mac = hmac.new(shared_secret.encode("utf-8"), digestmod=hashlib.sha1)
    mac.update(nonce.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(username.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(password.encode("utf-8"))
    mac.update(b"\x00")
    mac.update(b"admin" if admin else b"notadmin")
    return mac.hexdigest()


@dataclass
class LocalSynapse:
    """A Synapse homeserver in ``workdir``, listening on ``127.0.0.1:port`` only.

    ``server_name`` is the Matrix server name (the host part of user ids and mxc
    URIs). It defaults to ``"localhost"`` and does not depend on the port, so an
    appservice registration can be written before the port is chosen; the client
    API is reached at :attr:`base_url`, never through the server name (there is no
    federation and no key server).
    """

    workdir: Path
    registration_files: list[Path] = field(default_factory=list)
    server_name: str = "localhost"
    port: int | None = None
    registration_shared_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    max_upload_size: str = "2G"
    extra_config: dict[str, Any] = field(default_factory=dict)
    # Kept per instance so a stop() and start() again keeps sessions valid.
    _macaroon_secret_key: str = field(
        default_factory=lambda: secrets.token_urlsafe(32), init=False, repr=False
    )
    _form_secret: str = field(
        default_factory=lambda: secrets.token_urlsafe(32), init=False, repr=False
    )
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log_file: IO[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def base_url(self) -> str:
        """The client-server API base, e.g. ``http://127.0.0.1:8008``."""
        if self.port is None:
            raise RuntimeError("LocalSynapse has no port yet: call start() first")
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "homeserver.log"

    @property
    def pid(self) -> int | None:
        """The Synapse process id while it runs."""
        return self._process.pid if self._process is not None else None

    def homeserver_config(self) -> dict[str, Any]:
        """The homeserver.yaml content (needs :attr:`port` set)."""
        if self.port is None:
            raise RuntimeError("LocalSynapse.port must be set before building the config")
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "report_stats": False,
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": [LOOPBACK],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    # "client" includes the media endpoints (synapse/app/homeserver.py).
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "media_store_path": str(self.workdir / "media_store"),
            "signing_key_path": str(self.workdir / "signing.key"),
            "macaroon_secret_key": self._macaroon_secret_key,
            "form_secret": self._form_secret,
            "registration_shared_secret": self.registration_shared_secret,
            "enable_registration": False,
            # Cheap password hashing: these accounts are throwaway.
            "bcrypt_rounds": 4,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "app_service_config_files": [str(path) for path in self.registration_files],
            # MSC3916: media only through /_matrix/client/v1/media, legacy paths frozen.
            "enable_authenticated_media": True,
            "max_upload_size": self.max_upload_size,
            "url_preview_enabled": False,
            "presence": {"enabled": False},
            "caches": {"global_factor": 0.5},
            **_RATE_LIMITS,
        }
        config.update(self.extra_config)
        return config

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_path = self.workdir / "signing.key"
        if not key_path.exists():
            key_path.write_text(_signing_key_line(), encoding="ascii")
            key_path.chmod(0o600)
        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        with self.config_path.open("w", encoding="utf-8") as out:
            yaml.dump(self.homeserver_config(), out)

    def _spawn(self) -> None:
        # Blocking but short (fork/exec); kept out of the coroutine on purpose.
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(  # noqa: S603 - fixed argv, our own interpreter
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def log_tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The last ``max_bytes`` of the Synapse log, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_bytes:].decode("utf-8", errors="replace")

    async def start(self, timeout: float = 60.0) -> None:  # noqa: ASYNC109 - the documented API
        """Write the config, start Synapse and wait until ``/_matrix/client/versions`` is 200.

        Raises RuntimeError with the tail of the log if Synapse exits or does not
        answer within ``timeout`` seconds (the process is stopped in that case).
        """
        if self._process is not None:
            raise RuntimeError("LocalSynapse is already started")
        if self.port is None:
            self.port = free_ports(1)[0]
        self._write_files()
        started = time.monotonic()
        self._spawn()
        try:
            await self._wait_ready(started + timeout)
        except BaseException:
            await self.stop()
            raise
        log.info(
            "Synapse %s ready at %s after %.1f s",
            self.server_name,
            self.base_url,
            time.monotonic() - started,
        )

    async def _wait_ready(self, deadline: float) -> None:
        url = self.base_url + "/_matrix/client/versions"
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                process = self._process
                if process is None or process.poll() is not None:
                    code = None if process is None else process.returncode
                    raise RuntimeError(
                        f"Synapse exited during start-up (exit code {code}); "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Synapse did not answer {url} in time; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(_POLL_INTERVAL)

    async def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Safe to call more than once."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("Synapse pid %d ignored SIGTERM; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    async def __aenter__(self) -> LocalSynapse:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def register_user(
        self, localpart: str, password: str | None = None, admin: bool = False
    ) -> tuple[str, str]:
        """Register a user through the shared-secret admin API; return (user_id, access_token).

        Protocol: GET a nonce from ``/_synapse/admin/v1/register``, then POST it with
        an HMAC-SHA1 over nonce, username, password and admin flag.
        """
        if password is None:
            password = secrets.token_urlsafe(16)
        url = self.base_url + "/_synapse/admin/v1/register"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(url) as response:
                body = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"nonce request failed: {response.status} {body}")
                nonce = body["nonce"]
            payload = {
                "nonce": nonce,
                "username": localpart,
                "password": password,
                "admin": admin,
                "mac": registration_mac(
                    self.registration_shared_secret, nonce, localpart, password, admin
                ),
            }
            async with session.post(url, json=payload) as response:
                body = await response.json()
                if response.status != 200:
                    raise RuntimeError(
                        f"registering {localpart!r} failed: {response.status} {body}"
                    )
        return body["user_id"], body["access_token"]


def pid_is_running(pid: int) -> bool:
    """True if a process with this pid exists (used to check that stop() really stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
