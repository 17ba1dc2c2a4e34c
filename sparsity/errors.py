"""One exception family for every failure a user can cause or fix.

The CLI turns a ``CspError`` into its one-line message and its exit code, once, at the
edge (cli/_app.py); library callers catch it like any exception. Messages name what was
wrong and how to fix it, and never carry a secret.

Exit codes: 2 when the command line or what it names is wrong (a bad flag value, a
malformed or missing path, an unknown task); 1 when the world failed a correct command (S3
or Ray unreachable, credentials refused, a server or node that would not start).
"""

from __future__ import annotations

USAGE = 2
RUNTIME = 1


class CspError(Exception):
    """A failure with a one-line, user-facing message; ``exit_code`` overrides the class's."""

    exit_code = USAGE

    def __init__(self, message: str = "", exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CspRuntimeError(CspError):
    """The environment failed a well-formed command (exit 1)."""

    exit_code = RUNTIME


class ConfigError(CspError, ValueError):
    """A configuration value out of its allowed range (also a ValueError, so callers outside csp can catch it as one; docs/design.md, Conventions)."""


class CorpusError(CspError):
    """The corpus source is missing, empty, or unreadable."""


class TokenizerError(CspError):
    """A tokenizer could not be trained or loaded."""
