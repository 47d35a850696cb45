"""Node-metadata keys fxadapt writes on FX nodes, in one place.

Every tool downstream (passes, exporters, the visualizer) reads these keys and nothing else, so a
node always says where it came from. Values are plain JSON-able dicts.
"""

from __future__ import annotations

from typing import Any

from torch import fx

# On base-model nodes that the site finder tagged: {"role": "attn.q", "layer": 0, "module": "encoder.layer.0..."}
SITE = "fxadapt_site"
# On nodes a pass created: {"adapter": "a", "method": "lora", "pass": "insert_adapters", "site": "attn.q",
# "layer": 0}. Nodes created by optimization passes record the pass that made them the same way.
ORIGIN = "fxadapt"
# On nodes whose weights an optimization pass changed in place, e.g. a linear that merge_lora folded
# an adapter into: list of {"adapter": ..., "method": ..., "pass": ...}.
MERGED = "fxadapt_merged"


def site_of(node: fx.Node) -> dict[str, Any] | None:
    """The site tag of a base-model node, or None."""
    return node.meta.get(SITE)


def origin_of(node: fx.Node) -> dict[str, Any] | None:
    """Which adapter, method and pass created this node, or None for base-model nodes."""
    return node.meta.get(ORIGIN)


def inherit_meta(new: fx.Node, anchor: fx.Node, **origin: Any) -> None:
    """Copy the anchor's metadata onto a new node (never drop it) and record the new node's origin.

    `val`/`tensor_meta` are copied only when shapes are unchanged by construction; callers that
    change shape pass `keep_val=False` inside `origin`.
    """
    keep_val = origin.pop("keep_val", True)
    for key, value in anchor.meta.items():
        if key in (SITE, ORIGIN, MERGED):
            continue
        if not keep_val and key in ("val", "tensor_meta"):
            continue
        new.meta.setdefault(key, value)
    new.meta[ORIGIN] = dict(origin)
