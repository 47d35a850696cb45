"""Error types that map to the CLI's exit codes (DESIGN.md: 2 user error, 3 verification, 1 bug)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: bad spec, checkpoint, model or path. Exit code 2.

    The message is one paragraph: what is wrong, where (JSON path, file, module), what to do.
    """

    exit_code = 2


class VerificationError(Exception):
    """An artifact was written but its outputs differ from the eager reference. Exit code 3."""

    exit_code = 3


def where(path: str, message: str) -> UserError:
    """A UserError located at a JSON path such as `$.adapters.a.r`."""
    return UserError(f"{path}: {message}")
