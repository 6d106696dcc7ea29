"""MediaProxy links minted by the real matrix-appservice-bridge from npm.

The package is installed with ``--ignore-scripts`` into a temporary directory (the
postinstall of ``@matrix-org/matrix-sdk-crypto-nodejs`` downloads a native binary,
which cannot run here); a stand-in takes that module's place, since MediaProxy never
uses it but the package's index imports it. The key is imported as matrix-appservice-irc
imports its ``mediaProxy.signingKeyPath`` JWK: WebCrypto ``importKey("jwk", …,
{name: "HMAC", hash: "SHA-512"})``.

Without node or npm, or when the install fails, a test using it is skipped, except in
CI (``CI`` set), where it fails: CI must show that real links are served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

PACKAGE = "matrix-appservice-bridge@11.2.0"
STAND_IN = """\
// Stand-in for the native crypto module (its binary comes from a postinstall download).
class Unavailable { constructor() { throw new Error("matrix-sdk-crypto-nodejs stand-in"); } }
module.exports = new Proxy({}, {
  get: (_t, name) => (name === "__esModule" ? false : Unavailable),
});
"""
MINT = """\
const { webcrypto } = require("node:crypto");
const fs = require("node:fs");
const { MediaProxy } = require("matrix-appservice-bridge");
(async () => {
  const [jwkPath, publicUrl, ttl, mxc] = process.argv.slice(2);
  const jwk = JSON.parse(fs.readFileSync(jwkPath, "utf8"));
  const key = await webcrypto.subtle.importKey(
    "jwk", jwk, { name: "HMAC", hash: "SHA-512" }, true, ["sign", "verify"]);
  const proxy = new MediaProxy(
    { publicUrl: new URL(publicUrl), ttl: Number(ttl) || undefined, signingKey: key }, {});
  console.log((await proxy.generateMediaUrl(mxc)).toString());
})().catch((e) => { console.error(e); process.exit(1); });
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"matrix-appservice-bridge from npm is required in CI: {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class MediaProxyMinter:
    directory: Path

    def mint(self, jwk_path: Path, public_url: str, ttl_ms: int, mxc: str) -> str:
        """``MediaProxy.generateMediaUrl(mxc)`` with ``ttl`` in ms (0: no expiry)."""
        done = subprocess.run(
            ["node", str(self.directory / "mint.js"), str(jwk_path), public_url, str(ttl_ms), mxc],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def install(directory: Path) -> MediaProxyMinter:
    """npm-install the package into ``directory`` (skip, or fail in CI, if impossible)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        _unavailable("node and npm are not installed")
    (directory / "package.json").write_text(json.dumps({"name": "mint", "private": True}))
    done = subprocess.run(
        [npm, "install", "--ignore-scripts", "--no-audit", "--no-fund", PACKAGE],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        _unavailable(f"npm install {PACKAGE} failed: {done.stderr[-2000:]}")
    stand_in = directory / "node_modules" / "@matrix-org" / "matrix-sdk-crypto-nodejs"
    stand_in.mkdir(parents=True, exist_ok=True)
    (stand_in / "index.js").write_text(STAND_IN)
    (directory / "mint.js").write_text(MINT)
    return MediaProxyMinter(directory)
