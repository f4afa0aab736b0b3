"""Every error a user can meet, each with the fix in its message.

The CLI prints ``str(error)`` on one line and exits with ``exit_code``. Library code raises these and never
calls ``sys.exit``. Errors also inherit the matching built-in, so callers that catch ``ValueError`` or
``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class CotCompressError(Exception):
    """Base class: a problem the user can fix. The message says what is wrong and what to do next."""

    exit_code = 2

    def __str__(self) -> str:
        # One line, always: the CLI contract is a single actionable line.
        return " ".join(super().__str__().split())


class ConfigError(CotCompressError, ValueError):
    """The study config (YAML) is missing, malformed or holds a wrong value."""


class DataError(CotCompressError, ValueError):
    """A data file (GSM8K rows, SFT rows) is missing or malformed."""


class ArtifactError(CotCompressError, ValueError):
    """A run-directory artifact (samples, metrics, training.json, summary) is missing or inconsistent."""


class TemplateError(CotCompressError, ValueError):
    """A card template is missing, misspells a variable or tries to leave the sandbox."""


class CardValidationError(CotCompressError, ValueError):
    """A rendered card failed validation and must not be published."""


class HubError(CotCompressError, RuntimeError):
    """Talking to the Hub failed: token, permissions, repo ids, conflicts."""


class TrainingError(CotCompressError, RuntimeError):
    """Training cannot start or continue (missing data, no checkpoint to resume, no GPU for NF4)."""
