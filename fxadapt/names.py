"""The one rule for adapter and fusion names, wherever a name enters (spec, `add_adapter`, a checkpoint's config).

A name becomes a directory name (`save_all_adapters`), part of a module path (`fxadapt.<name>.L0_attn.q`) and
a checkpoint key, so it must not contain path separators or `..`, must not shadow an attribute of the model
classes (`__init__`), and must stay short enough for a file name.
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

MAX_LENGTH = 128


def check_name(name: Any, path: str, what: str = "adapter name") -> str:
    """`name` if it is a usable adapter/fusion name, else a UserError naming `path` and what to change."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{path}: the {what} must be a non-empty string, got {name!r}.")
    problem = None
    if len(name) > MAX_LENGTH:
        problem = f"is {len(name)} characters long (at most {MAX_LENGTH})"
    elif "/" in name or "\\" in name or "\0" in name:
        problem = "contains a path separator"
    elif name in (".", "..") or name.startswith(".."):
        problem = "is a relative directory name"
    elif name.startswith("__") and name.endswith("__"):
        problem = "is a dunder name that would shadow a Python attribute"
    elif not name.isprintable():
        problem = "contains non-printable characters"
    if problem:
        raise UserError(f"{path}: the {what} {name[:40]!r}{'...' if len(name) > 40 else ''} {problem}; use letters, "
                        "digits, '_' or '-'.")
    return name
