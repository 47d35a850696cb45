"""How nodes and modules look in every format: stable colours and short labels.

One colour per op category (pale, like Netron) and one per adapter/method (saturated). Colours depend
only on names, so the same adapter looks the same in every render and every format.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable
from typing import Any

# Pale fills so adapter nodes (saturated) stand out against the base model.
CATEGORY_FILL = {
    "io": "#e5e7eb",
    "param": "#f3f4f6",
    "linear": "#dbeafe",
    "embedding": "#e0e7ff",
    "norm": "#ccfbf1",
    "activation": "#ffedd5",
    "attention": "#fce7f3",
    "arith": "#fef9c3",
    "shape": "#f5f5f4",
    "module": "#ede9fe",
    "other": "#f1f5f9",
}

_CATEGORY_PATTERNS = [
    ("linear", r"\b(linear|addmm|mm|bmm|matmul|conv\w*|baddbmm)\b"),
    ("embedding", r"\bembedding\w*\b"),
    ("norm", r"\b\w*(layer_norm|rms_norm|group_norm|batch_norm)\w*\b"),
    ("attention", r"\b(scaled_dot_product_attention|_?softmax)\b"),
    ("activation", r"\b(gelu|relu|silu|tanh|sigmoid|hardtanh|elu|leaky_relu|mish)\w*\b"),
    ("arith", r"\b(add|sub|mul|div|rsub|neg|pow|sqrt|rsqrt|mean|sum|where|exp|cos|sin)\b"),
    ("shape", r"\b(view|reshape|_unsafe_view|transpose|permute|expand|unsqueeze|squeeze|slice|select|cat|"
              r"split\w*|chunk|contiguous|clone|t|getitem|flatten|unflatten|dropout|to|_to_copy|alias)\b"),
]

# Saturated, mutually distinct, white text readable; green, red, violet and amber are left to the diff
# colours (which are drawn as outlines, adapters as fills).
ADAPTER_PALETTE = ["#2563eb", "#ea580c", "#0891b2", "#db2777", "#0f766e", "#854d0e", "#4338ca", "#c026d3",
                   "#0369a1", "#9f1239"]

DIFF_COLORS = {"inserted": "#16a34a", "removed": "#dc2626", "merged": "#7c3aed", "rewired": "#d97706"}

METHOD_GLYPH = {"lora": "LoRA", "bottleneck": "BN"}


def category(record: dict[str, Any]) -> str:
    """The op category of a node record, for its fill colour."""
    if record["op"] in ("placeholder", "output"):
        return "io"
    if record["op"] == "get_attr":
        return "param"
    if record["op"] == "call_module":
        return "module"
    op = short_target(record)
    for name, pattern in _CATEGORY_PATTERNS:
        if re.fullmatch(pattern, op):
            return name
    return "other"


def adapter_key(origin: dict[str, Any]) -> str:
    return f"{origin.get('adapter', '?')}/{origin.get('method', '?')}"


def adapter_keys(record: dict[str, Any]) -> list[str]:
    """The adapters acting at a node: the one that created it, and those merged into its weights."""
    keys = [adapter_key(record["origin"])] if record.get("origin") else []
    return keys + [adapter_key(m) for m in record.get("merged") or []]


def adapter_colors(keys: Iterable[str]) -> dict[str, str]:
    """A colour per `adapter/method` key: by CRC32 of the key, probing past colours already taken.

    Keys are visited in sorted order, so the assignment is deterministic for a given set of adapters
    and an adapter keeps its colour whenever it does not collide."""
    taken: dict[str, str] = {}
    used: set[int] = set()
    for key in sorted(set(keys)):
        index = zlib.crc32(key.encode()) % len(ADAPTER_PALETTE)
        for step in range(len(ADAPTER_PALETTE)):
            probe = (index + step) % len(ADAPTER_PALETTE)
            if probe not in used or len(used) >= len(ADAPTER_PALETTE):
                index = probe
                break
        used.add(index)
        taken[key] = ADAPTER_PALETTE[index]
    return taken


def short_target(record: dict[str, Any]) -> str:
    """`linear` for aten.linear.default, `getitem` for _operator.getitem, the path otherwise."""
    target = record["target"]
    if record["op"] == "call_function":
        parts = target.split(".")
        return parts[1] if target.startswith("aten.") and len(parts) > 1 else parts[-1]
    if record["op"] in ("placeholder", "output"):
        return record["op"]
    return target


def node_title(record: dict[str, Any]) -> str:
    """The bold first line of a node: the op, or `LoRA a` for an adapter module."""
    origin = record.get("origin")
    if record["op"] == "call_module" and origin:
        return f"{METHOD_GLYPH.get(origin.get('method'), origin.get('method'))} {origin.get('adapter')}"
    if record["op"] == "get_attr":
        return record["target"].rpartition(".")[2]
    if record["op"] == "placeholder":
        return record["name"]
    return short_target(record)


def shape_text(record: dict[str, Any]) -> str:
    """`[s0, s1, 32]` for the first output (or the tensor behind a get_attr)."""
    shapes = record.get("shapes") or []
    if record["op"] == "get_attr" and record.get("params"):
        return "[" + ", ".join(map(str, next(iter(record["params"].values()))["shape"])) + "]"
    if shapes and shapes[0] is not None:
        return "[" + ", ".join(map(str, shapes[0])) + "]"
    return ""


def short_type(kind: str) -> str:
    """`BertLayer` for transformers.models.bert.modeling_bert.BertLayer."""
    return kind.rpartition(".")[2]


def group_subtitle(kind: str, node_count: int) -> str:
    """`BertLayer`, or `33 ops` for the folded loose ops of the model level."""
    return short_type(kind) if kind else f"{node_count} ops"


def frame_header(label: str, kind: str) -> str:
    """`layer.0 · BertLayer`; just `BertModel` when the label already is the type."""
    short = short_type(kind)
    return f"{label} · {short}" if short and short != label else label
