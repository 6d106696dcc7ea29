"""The base of every config section: a frozen mapping that refuses unknown keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from relay.config.values import fail


class Section(BaseModel):
    """A mapping in the config: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    shape: ClassVar[str] = "a mapping"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: object) -> object:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            fail(f"expected {cls.shape}, got {data!r}")
        return dict(data)
