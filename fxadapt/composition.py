"""Composition blocks of the spec's `"active"`, parsed and validated with the reference's rules.

    "a"                                         a single adapter (the reference wraps it in Stack)
    {"stack": [...]}                            sequential
    {"parallel": [...]}                         batch replicated N times, child i on copy i
    {"fuse": [...], "name": "f"?}               AdapterFusion over the children's outputs
    {"split": [...], "splits": [..] | n}        sequence split
    {"batch_split": [...], "batch_sizes": [..] | n}
    {"average": [...], "weights": [...]?, "normalize_weights": true?}
    {"multi_task": [...]}                       per-row `task_ids` input

Nesting follows `adapters.composition.ALLOWED_NESTINGS`; below the top level only Stack may hold
blocks beyond depth 1 (the reference's `validate_composition`). Errors name the JSON path and rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError


@dataclass
class Block:
    kind: str
    children: list[Block | str]
    path: str
    splits: list[int] = field(default_factory=list)  # split / batch_split sizes
    weights: list[float] = field(default_factory=list)  # average, normalized as the reference does
    name: str | None = None  # fuse

    def flatten(self) -> list[str]:
        names: list[str] = []
        for child in self.children:
            names += child.flatten() if isinstance(child, Block) else [child]
        return names

    def first(self) -> str:
        child = self.children[0]
        return child.first() if isinstance(child, Block) else child

    def last(self) -> str:
        child = self.children[-1]
        return child.last() if isinstance(child, Block) else child

    @property
    def fusion_name(self) -> str:
        return self.name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def to_json(self) -> Any:
        data: dict[str, Any] = {self.kind: [c.to_json() if isinstance(c, Block) else c for c in self.children]}
        if self.kind == "split":
            data["splits"] = self.splits
        if self.kind == "batch_split":
            data["batch_sizes"] = self.splits
        if self.kind == "average":
            data["weights"] = self.weights
        if self.kind == "fuse" and self.name:
            data["name"] = self.name
        return data


KINDS = ("stack", "parallel", "fuse", "split", "batch_split", "average", "multi_task")
ALLOWED_NESTINGS: dict[str, tuple[str, ...]] = {
    "stack": ("str", "fuse", "split", "parallel", "batch_split", "average", "multi_task"),
    "fuse": ("str", "stack"),
    "split": ("str", "split", "stack", "batch_split", "average"),
    "parallel": ("str", "stack", "batch_split", "average"),
    "multi_task": ("str", "stack", "average", "fuse"),
    "batch_split": ("str", "stack", "split", "batch_split", "average"),
    "average": ("str", "stack", "split", "batch_split"),
}
_EXTRA_KEYS = {"split": {"splits"}, "batch_split": {"batch_sizes"}, "average": {"weights", "normalize_weights"},
               "fuse": {"name"}}


def parse_composition(value: Any, adapters: set[str], path: str = "$.active", level: int = 0) -> Block | str:
    """Parse a composition, checking adapter names, nesting, depth and sizes."""
    if isinstance(value, str):
        if value not in adapters:
            raise UserError(f"{path}: unknown adapter {value!r}; defined adapters: {', '.join(sorted(adapters))}.")
        return value
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected an adapter name or a block such as {{\"stack\": [\"a\", \"b\"]}}.")
    kinds = [k for k in value if k in KINDS]
    if len(kinds) != 1:
        raise UserError(f"{path}: a composition block has exactly one of the keys {', '.join(KINDS)}.")
    kind = kinds[0]
    extra = sorted(set(value) - {kind} - _EXTRA_KEYS.get(kind, set()))
    if extra:
        raise UserError(f"{path}: unknown key(s) {extra} for a {kind} block.")
    items = value[kind]
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}.{kind}: expected a non-empty list of adapter names or blocks.")
    # The reference's depth rule: below level 1 only Stack (or a name) may appear.
    if level > 1 and kind != "stack":
        raise UserError(f"{path}: the setup is too deep: a {kind} block cannot stand at nesting level {level} "
                        "(only stack may nest that deep, as in adapters 1.3.0).")
    children = []
    for i, item in enumerate(items):
        child_path = f"{path}.{kind}[{i}]"
        child = parse_composition(item, adapters, child_path, level + 1)
        child_kind = child.kind if isinstance(child, Block) else "str"
        if child_kind not in ALLOWED_NESTINGS[kind]:
            raise UserError(f"{child_path}: cannot nest {child_kind} inside {kind}; {kind} may hold "
                            f"{', '.join(ALLOWED_NESTINGS[kind])} (the reference's nesting rules).")
        children.append(child)
    block = Block(kind, children, path)
    if kind in ("split", "batch_split"):
        key = "splits" if kind == "split" else "batch_sizes"
        sizes = value.get(key)
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = [sizes] * len(children)
        if not isinstance(sizes, list) or len(sizes) != len(children) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise UserError(f"{path}.{key}: expected one positive integer per child ({len(children)}) or one "
                            "integer for all.")
        block.splits = sizes
    elif kind == "average":
        weights = value.get("weights")
        if weights is None:
            block.weights = [1 / len(children)] * len(children)
        else:
            if not isinstance(weights, list) or len(weights) != len(children) or not all(
                    isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
                raise UserError(f"{path}.weights: expected one number per child ({len(children)}).")
            if value.get("normalize_weights", True):
                total = sum(weights) or 1
                weights = [w / total for w in weights]
            block.weights = [float(w) for w in weights]
    elif kind == "fuse" and "name" in value:
        block.name = str(value["name"])
    return block


def check_sizes(block: Block | str, batch: int | None, seq: int | None) -> None:
    """Split sums must equal the sequence length, BatchSplit sums the batch size (where they are known)."""
    if not isinstance(block, Block):
        return
    if block.kind == "split" and seq is not None and sum(block.splits) != seq:
        raise UserError(f"{block.path}.splits: the splits sum to {sum(block.splits)} but the sequence length is "
                        f"{seq}; Split pins the sequence length, so the splits must add up to it.")
    if block.kind == "batch_split" and batch is not None and sum(block.splits) != batch:
        raise UserError(f"{block.path}.batch_sizes: the sizes sum to {sum(block.splits)} but the batch size is "
                        f"{batch}; BatchSplit pins the batch size, so the sizes must add up to it.")
    for child in block.children:
        check_sizes(child, batch, seq)


def pinned_dims(block: Block | str | None) -> dict[str, int]:
    """The dims a setup fixes: {"batch": sum of the outermost BatchSplit's sizes, "seq": the outermost Split's
    sum}. The compiled graph is exported with these dims static (report.json's "pinned")."""
    pins: dict[str, int] = {}
    if not isinstance(block, Block):
        return pins
    if block.kind == "batch_split":
        pins["batch"] = sum(block.splits)
    if block.kind == "split":
        pins["seq"] = sum(block.splits)
    for child in block.children:
        for key, value in pinned_dims(child).items():
            pins.setdefault(key, value)
    return pins


def multi_task_children(block: Block | str | None) -> int:
    """How many tasks a multi_task block routes to (0 when the setup has none)."""
    if not isinstance(block, Block):
        return 0
    if block.kind == "multi_task":
        return len(block.children)
    return max((multi_task_children(c) for c in block.children), default=0)


def parallel_channels(block: Block | str | None) -> int:
    """How many copies of the batch a Parallel block makes (1 without one)."""
    if not isinstance(block, Block):
        return 1
    if block.kind == "parallel":
        return len(block.children)
    return max((parallel_channels(c) for c in block.children), default=1)


def setup_dynamic_shapes(dynamic_shapes: dict[str, dict[int, Any]], block: Block | str | None
                         ) -> dict[str, dict[int, Any]]:
    """The export's dynamic dims for a setup (a copy): the dims Split / BatchSplit pin are made static, and a
    Parallel's batch is bounded so that its N copies stay in range (torch.export also guards batch >= 2 there)."""
    from torch.export import Dim

    pins, channels = pinned_dims(block), parallel_channels(block)
    shapes = {name: dict(dims) for name, dims in dynamic_shapes.items()}
    if channels > 1 and "batch" not in pins:
        batch = Dim("batch", min=2, max=4096 // channels)
        for dims in shapes.values():
            if 0 in dims:
                dims[0] = batch
    for dims in shapes.values():
        for axis, key in ((0, "batch"), (1, "seq")):
            if key in pins:
                dims.pop(axis, None)
    return shapes

