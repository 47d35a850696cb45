"""JSON snapshots of an FX graph at one compiler stage, and the diff between two snapshots.

A snapshot is plain JSON (format documented in docs/visualizer.md) so that every renderer, and any
outside tool, reads the same data; nothing downstream touches torch. Nodes are matched across stages
by name, which fxadapt passes keep stable for the nodes they do not touch.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import fx

from fxadapt import meta

FORMAT = "fxadapt.graph"
VERSION = 1
_ARGS_MAX = 240
# torch.export writes these for nodes it could not attribute to a module (e.g. `_guards_fn`).
_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"


def snapshot(gm: fx.GraphModule, stage: str) -> dict[str, Any]:
    """A JSON-able description of `gm`'s graph at `stage` (e.g. "captured", "rewritten", "optimized")."""
    graph_nodes = list(gm.graph.nodes)
    stacks = {node: _module_stack(node) for node in graph_nodes}
    known = {path: kind for stack in stacks.values() for path, kind in stack}
    # get_attr nodes carry no nn_module_stack: place them in the module that owns the tensor, or
    # failing that (adapter parameters live under `fxadapt.*`) beside the node that uses them.
    for node in graph_nodes:
        if node.op == "get_attr" and not stacks[node]:
            stacks[node] = _stack_for_attr(node, stacks, known)
    nodes = [_node_record(gm, node, index, stacks[node]) for index, node in enumerate(graph_nodes)]
    modules = {path: kind for stack in stacks.values() for path, kind in stack}
    return {"format": FORMAT, "version": VERSION, "stage": stage, "modules": modules, "nodes": nodes}


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Node names inserted, removed, merged and rewired from `before` to `after` (each in graph order).

    A name present in both stages counts as the same node only if its op, target and origin agree; a
    pass that reuses a freed name for a new node shows up as removed + inserted. `merged` lists nodes
    that gained `fxadapt_merged` records; `rewired` those whose inputs changed; `changed` is their union.
    """
    old = {n["name"]: n for n in before["nodes"]}
    new = {n["name"]: n for n in after["nodes"]}
    same = {name for name in old.keys() & new.keys() if same_node(old[name], new[name])}
    merged = [n["name"] for n in after["nodes"] if n["name"] in same
              and len(n.get("merged") or []) > len(old[n["name"]].get("merged") or [])]
    rewired = [n["name"] for n in after["nodes"] if n["name"] in same and n["inputs"] != old[n["name"]]["inputs"]]
    changed = set(merged) | set(rewired)
    return {
        "before": before["stage"],
        "after": after["stage"],
        "inserted": [n["name"] for n in after["nodes"] if n["name"] not in same],
        "removed": [n["name"] for n in before["nodes"] if n["name"] not in same],
        "merged": merged,
        "rewired": rewired,
        "changed": [n["name"] for n in after["nodes"] if n["name"] in changed],
    }


def same_node(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of the same name (in two stages) describe the same node."""
    return a["op"] == b["op"] and a["target"] == b["target"] and a.get("origin") == b.get("origin")


def _node_record(gm: fx.GraphModule, node: fx.Node, index: int, stack: list[list[str]]) -> dict[str, Any]:
    shapes, dtypes = _shapes_and_dtypes(node.meta.get("val"))
    record: dict[str, Any] = {
        "name": node.name,
        "index": index,
        "op": node.op,
        "target": target_str(node),
        "args": _args_str(node),
        "inputs": list(dict.fromkeys(n.name for n in node.all_input_nodes)),
        "users": [user.name for user in node.users],
        "module": stack[-1][0] if stack else "",
        "module_type": stack[-1][1] if stack else "",
        "module_stack": stack,
        "shapes": shapes,
        "dtypes": dtypes,
        "site": _plain(node.meta.get(meta.SITE)),
        "origin": _plain(node.meta.get(meta.ORIGIN)),
        "merged": _plain(node.meta.get(meta.MERGED)),
        "params": _params(gm, node),
    }
    return record


def target_str(node: fx.Node) -> str:
    """`aten.linear.default`, `_operator.getitem`, or the module/attribute path."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    return fx.node._get_qualified_name(target)


def _module_stack(node: fx.Node) -> list[list[str]]:
    """[[module path, module type], ...] from the outermost module to the innermost, root path ""."""
    raw = node.meta.get("nn_module_stack") or {}
    stack: list[list[str]] = []
    for key, value in raw.items():
        path, kind = value if isinstance(value, tuple | list) and len(value) == 2 else (key, "")
        if _EMPTY_STACK in (key, path):
            continue
        path, kind = _clean_path(str(path)), _clean_type(kind)
        # A module called twice appears twice (keys `x`, `x@1`); the hierarchy needs it once.
        if not stack or stack[-1][0] != path:
            stack.append([path, kind])
    return stack


def _clean_path(path: str) -> str:
    """Normalise strict-mode spellings (`L['self'].layer[0]`, `L__self___layer`) to `layer.0`."""
    path = re.sub(r"^L\['self'\]\.?|^L__self__\.?|^self\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _clean_type(kind: Any) -> str:
    if isinstance(kind, type):
        return f"{kind.__module__}.{kind.__qualname__}"
    match = re.match(r"<class '(.+)'>", str(kind))
    return match.group(1) if match else str(kind)


def _stack_for_attr(node: fx.Node, stacks: dict[fx.Node, list[list[str]]],
                    known: dict[str, str]) -> list[list[str]]:
    owner = str(node.target).rpartition(".")[0]
    if owner in known or owner == "":
        parts = owner.split(".") if owner else []
        prefixes = [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return [[p, known.get(p, "")] for p in prefixes if p in known or p == owner]
    user_stacks = [stacks[user] for user in node.users if stacks.get(user)]
    if user_stacks and all(s == user_stacks[0] for s in user_stacks):
        return [list(entry) for entry in user_stacks[0]]
    return [["", known.get("", "")]] if "" in known else []


def _shapes_and_dtypes(val: Any) -> tuple[list[Any], list[str | None]]:
    """One shape (list of ints, symbolic dims as strings) and dtype per output of the node."""
    values = list(val) if isinstance(val, tuple | list) else ([] if val is None else [val])
    shapes: list[Any] = []
    dtypes: list[str | None] = []
    for item in values:
        if isinstance(item, torch.Tensor):
            shapes.append([d if isinstance(d, int) else str(d) for d in item.shape])
            dtypes.append(str(item.dtype).removeprefix("torch."))
        elif isinstance(item, torch.SymInt | torch.SymFloat | torch.SymBool | int | float | bool):
            shapes.append([])
            dtypes.append(type(item).__name__)
        else:
            shapes.append(None)
            dtypes.append(None)
    return shapes, dtypes


def _params(gm: fx.GraphModule, node: fx.Node) -> dict[str, dict[str, Any]] | None:
    """Tensor shapes behind a get_attr node, or the parameters of a called module (adapters)."""
    try:
        if node.op == "get_attr":
            tensor = _fetch_attr(gm, str(node.target))
            return {"": _tensor_info(tensor)} if isinstance(tensor, torch.Tensor) else None
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            params = {name: _tensor_info(p) for name, p in module.named_parameters()}
            return params or None
    except (AttributeError, KeyError):  # a pass may leave a dangling target; show the node anyway
        return None
    return None


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_info(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
            "numel": tensor.numel()}


class _Ref:
    """Prints as `%name` inside an argument repr."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return "%" + self.name


def _args_str(node: fx.Node) -> str:
    args = fx.node.map_arg(node.args, lambda n: _Ref(n.name))
    kwargs = fx.node.map_arg(node.kwargs, lambda n: _Ref(n.name))
    text = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    return text if len(text) <= _ARGS_MAX else text[:_ARGS_MAX - 1] + "…"


def _plain(value: Any) -> Any:
    """A JSON-safe deep copy, so later passes editing the metadata do not change the snapshot."""
    if value is None:
        return None
    return json.loads(json.dumps(value, default=str))
