"""One exception family for every failure a user can cause or fix.

The CLI turns a ``CspError`` into its one-line message and exit code 2, once, at the edge
(cli/main.py); library callers catch it like any exception. Messages name what was wrong
and how to fix it, and never carry a secret.
"""

from __future__ import annotations


class CspError(Exception):
    """A failure with a one-line, user-facing message."""

    exit_code = 2


class ConfigError(CspError, ValueError):
    """A configuration value out of its allowed range (also a ValueError, as STYLE.md asks)."""


class CorpusError(CspError):
    """The corpus source is missing, empty, or unreadable."""


class TokenizerError(CspError):
    """A tokenizer could not be trained or loaded."""
