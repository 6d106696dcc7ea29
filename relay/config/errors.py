"""The one exception of the config package: every problem found, one line each."""

from __future__ import annotations


class ConfigError(Exception):
    """One or more configuration problems, each one line that names its key.

    ``str()`` is the lines joined, so a single problem reads as before; the command
    line prints each of ``problems`` on its own line.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
