"""homeserver.redirect_hosts: empty by default; host names, IP addresses or networks."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.errors import ConfigError
from relay.config.loading import validate
from relay.upstream.redirects import RedirectPolicy
from tests.harness.config_documents import minimal


def test_default_follows_no_other_host(tmp_path: Path) -> None:
    """Without the key no redirect may leave the homeserver's origin."""
    config = validate(minimal(), base_dir=tmp_path)
    assert config.homeserver.redirect_hosts == ()
    assert RedirectPolicy.from_entries(config.homeserver.redirect_hosts) == RedirectPolicy()


def test_entries_are_read(tmp_path: Path) -> None:
    """Names are lowercased; addresses and networks become networks of the policy."""
    doc = minimal(homeserver={"redirect_hosts": ["S3.Example.NET", "10.0.0.0/8", "fd00::1"]})
    config = validate(doc, base_dir=tmp_path)
    policy = RedirectPolicy.from_entries(config.homeserver.redirect_hosts)
    assert policy.hosts == {"s3.example.net"}
    assert [str(n) for n in policy.networks] == ["10.0.0.0/8", "fd00::1/128"]


@pytest.mark.parametrize("entry", ["https://s3.example.net", "bad host", "10.0.0.0/40"])
def test_bad_entry_is_named(tmp_path: Path, entry: str) -> None:
    """A URL, a name with a space or a bad network is refused with the key named."""
    with pytest.raises(ConfigError) as e:
        validate(minimal(homeserver={"redirect_hosts": [entry]}), base_dir=tmp_path)
    assert str(e.value).startswith("homeserver.redirect_hosts: ")
