"""What every command shares: logging set-up and reading the config file."""

from __future__ import annotations

import logging
from pathlib import Path

from relay.config.loading import load, load_filling_secrets
from relay.config.settings import Config

log = logging.getLogger("relay")


def load_config(path: Path, *, fill_signing_keys: bool = False) -> Config:
    """Validate the config; optionally fill a missing signing key and write it back.

    The file is written only after the filled document validates, so a bad config
    is never overwritten.
    """
    if not fill_signing_keys:
        return load(path)
    config, written = load_filling_secrets(path, tokens=False)
    if written:
        log.info("generated a signing key and saved it in %s", path)
    return config
