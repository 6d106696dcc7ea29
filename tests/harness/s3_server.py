"""Pytest plugin: an S3-protocol server (moto's standalone server) and a fresh bucket per test.

``s3_server`` starts ``moto_server`` once per session as a subprocess on a free loopback
port (its own process: nothing of moto is imported into the tests' interpreter, and
its threads never meet the tests' event loops). ``s3_store`` creates a new bucket for
each test and gives its ``media.store`` config and a plain boto3 client to look into
the bucket behind the relay's back.

``s3_auth_server`` is a second server that checks credentials (moto accepts any by
default): ``INITIAL_NO_AUTH_ACTION_COUNT`` lets the first few requests through, which
create an IAM user with a key and a policy; every request after them must be signed
with that key.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from relay.config.media_settings import ObjectStoreConfig
from relay.devtools.local_synapse import free_ports

ACCESS_KEY = "relay-test-key"
SECRET_KEY = "relay-test-secret"
START_TIMEOUT = 30.0
# Requests the authenticating server lets through unsigned: the set-up below.
AUTH_SETUP_REQUESTS = 4


@dataclass(frozen=True)
class S3Server:
    url: str
    process: subprocess.Popen[bytes]


@dataclass(frozen=True)
class S3Store:
    """One fresh bucket: the relay's config for it and a client to inspect it."""

    config: ObjectStoreConfig
    client: Any  # boto3 S3 client

    def sizes(self, under: str = "") -> dict[str, int]:
        """Every key in the bucket under ``under`` (the whole bucket by default): its size."""
        sizes: dict[str, int] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.config.bucket, Prefix=under
        ):
            sizes |= {item["Key"]: item["Size"] for item in page.get("Contents", ())}
        return sizes

    def listing(self, under: str = "") -> list[str]:
        """Every key in the bucket under ``under``, sorted."""
        return sorted(self.sizes(under))

    def read(self, key: str) -> tuple[bytes, dict[str, Any]]:
        """An object's bytes and its GetObject answer."""
        response = self.client.get_object(Bucket=self.config.bucket, Key=key)
        return response["Body"].read(), response


def _start(log_path: Path, environ: dict[str, str] | None = None) -> S3Server:
    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    script = Path(sys.executable).parent / "moto_server"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(script), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environ or {})},
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited: {log_path.read_text(errors='replace')}")
        try:
            # moto's own API (not S3): does not count as one of the unsigned requests.
            # S310: the URL is our own http://127.0.0.1 one.
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):  # noqa: S310
                return S3Server(url, process)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto_server did not answer on {url}") from None
            time.sleep(0.05)


def _stop(server: S3Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server that takes any credentials."""
    server = _start(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server.url
    finally:
        _stop(server)


def store_config(endpoint: str, bucket: str, **values: Any) -> ObjectStoreConfig:
    data = {
        "kind": "s3",
        "endpoint": endpoint,
        "bucket": bucket,
        "prefix": "relay-test/",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        **values,
    }
    return ObjectStoreConfig.model_validate(data)


def s3_client(endpoint: str, key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
    )


@pytest.fixture
def s3_store(s3_server: str) -> Iterator[S3Store]:
    """A new, empty bucket on the session's S3 server."""
    bucket = f"relay-{secrets.token_hex(8)}"
    client = s3_client(s3_server)
    client.create_bucket(Bucket=bucket)
    try:
        yield S3Store(store_config(s3_server, bucket), client)
    finally:
        keys = S3Store(store_config(s3_server, bucket), client).listing()
        for start in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        client.delete_bucket(Bucket=bucket)
        client.close()


@pytest.fixture(scope="session")
def s3_auth_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Store]:
    """A bucket on a server that checks signatures: ``config`` holds a valid IAM key."""
    server = _start(
        tmp_path_factory.mktemp("moto-auth") / "moto.log",
        {"INITIAL_NO_AUTH_ACTION_COUNT": str(AUTH_SETUP_REQUESTS)},
    )
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=server.url,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="relay")
        key = iam.create_access_key(UserName="relay")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="relay", PolicyName="relay-media", PolicyDocument=json.dumps(policy)
        )
        bucket = f"relay-{secrets.token_hex(8)}"
        client = s3_client(server.url, key["AccessKeyId"], key["SecretAccessKey"])
        client.create_bucket(Bucket=bucket)
        config = store_config(
            server.url,
            bucket,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
        )
        yield S3Store(config, client)
    finally:
        _stop(server)
