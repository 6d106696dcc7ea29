"""Process exit codes (documented in the README) and the start-up error that carries one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_HOMESERVER = 4
EXIT_DATABASE = 5
EXIT_NEEDS_SETUP = 6


class StartupError(Exception):
    """Start-up failed for a reason the operator can fix; ``exit_code`` says which kind."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
