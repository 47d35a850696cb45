"""Parse AdapterHub config strings such as `"lora[r=4,alpha=8]"` or `"prefix_tuning|par_bn"`.

Same grammar as `adapters.utils.parse_adapter_config_string`: `name[key=value,...]` chunks joined by
`|`, values are Python literals. We parse values with `ast.literal_eval` only, never `eval`.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from ..errors import UserError

_CHUNK = re.compile(r"^(?P<name>[^\[\]\|\n]+)(?:\[(?P<kvs>.*)\])?$")


def parse_config_string(text: str, path: str = "$") -> list[tuple[str, dict[str, Any]]]:
    """Split a config string into `(method name, overrides)` pairs."""
    chunks = []
    for raw in text.split("|"):
        chunk = raw.strip()
        match = _CHUNK.match(chunk)
        if not match or not match.group("name").strip():
            raise UserError(
                f"{path}: invalid adapter config string {text!r}: expected `name` or `name[key=value,...]` "
                "chunks joined by `|`, e.g. \"lora[r=4,alpha=8]\"."
            )
        name = match.group("name").strip()
        kvs = match.group("kvs") or ""
        # Keys are bare identifiers in the AdapterHub syntax; quote them to get a Python dict literal.
        literal = "{" + re.sub(r"(\w+)\s*=", r"'\1':", kvs) + "}"
        try:
            overrides = ast.literal_eval(literal)
        except (ValueError, SyntaxError) as exc:
            raise UserError(
                f"{path}: cannot read the options {kvs!r} of {name!r} in config string {text!r} ({exc}); "
                "write them as key=value with Python literals, e.g. attn_matrices=['q','v']."
            ) from None
        chunks.append((name, overrides))
    return chunks
