"""Regular expressions from untrusted files (a PEFT checkpoint's `target_modules`, `exclude_modules`,
`layers_pattern`, `rank_pattern` keys), matched under a time bound.

Python's `re` backtracks without limit: `(\\w+\\.?)*Z` against a module name such as
`encoder.layer.0.attention.output.dense` takes longer than the universe has left, hanging the compiler. The
`regex` package (a dependency of transformers, so always present beside it) matches the same syntax with
`re`'s semantics (its default VERSION0), fails such patterns fast in most cases, and takes a timeout for the
rest; a pattern that runs out of time is a UserError naming it. Without `regex`, patterns are bounded by length.
"""

from __future__ import annotations

import re

from .errors import UserError

try:
    import regex as _engine
except ImportError:  # pragma: no cover - transformers requires regex
    _engine = None

TIMEOUT_S = 1.0
MAX_PATTERN = 256  # only where `regex` is missing: a short pattern cannot nest enough to hang for long


def _run(kind: str, pattern: str, string: str):
    if _engine is None:
        if len(pattern) > MAX_PATTERN:
            raise UserError(f"the pattern {pattern[:60]!r}... is {len(pattern)} characters long (at most "
                            f"{MAX_PATTERN}); use module names instead of a long regular expression.")
        return getattr(re, kind)(pattern, string)
    try:
        return getattr(_engine, kind)(pattern, string, timeout=TIMEOUT_S)
    except TimeoutError:
        raise UserError(f"the regular expression {pattern[:80]!r} takes more than {TIMEOUT_S:g} s to match the "
                        f"module name {string[:80]!r} (catastrophic backtracking); simplify it or list the module "
                        "names.") from None
    except _engine.error as exc:
        raise UserError(f"{pattern[:80]!r} is not a valid regular expression ({exc}).") from None


def match(pattern: str, string: str):
    """`re.match`, bounded in time."""
    return _run("match", pattern, string)


def fullmatch(pattern: str, string: str):
    """`re.fullmatch`, bounded in time."""
    return _run("fullmatch", pattern, string)
