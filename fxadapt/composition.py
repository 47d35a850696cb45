"""Composition blocks: the one Block type, the reference's block constructors over it, and the spec's
`"active"` parsed and validated with the reference's rules.

    "a"                                         a single adapter (the reference wraps it in Stack)
    {"stack": [...]}                            sequential                          Stack("a", "b")
    {"parallel": [...]}                         batch replicated N times            Parallel("a", "b")
    {"fuse": [...], "name": "f"?}               AdapterFusion over the children     Fuse("a", "b", name=None)
    {"split": [...], "splits": [..] | n}        sequence split                      Split("a", "b", splits=[..])
    {"batch_split": [...], "batch_sizes": [..] | n}                                 BatchSplit(..., batch_sizes=..)
    {"average": [...], "weights": [...]?, "normalize_weights": true?}               Average(..., weights=None)
    {"multi_task": [...]}                       per-row `task_ids` input            MultiTask("a", "b")

The compiler (passes/lower_composition.py, fxadapt/compose/) and the Python API (`fxadapt.Stack`, ...,
`model.active_adapters`) share `Block`; `Stack`, `Fuse`, ... only give it the constructor signatures of
`adapters.composition` 1.3.0, and a parsed setup is built from them too. Nesting follows the
reference's `ALLOWED_NESTINGS`; below the top level only Stack may hold blocks beyond depth 1 (its
`validate_composition`). Errors name the JSON path and rule.
"""

from __future__ import annotations

import math
from collections.abc import KeysView, Sequence
from typing import Any

from .errors import UserError
from .names import check_name


class Block(Sequence):
    """A composition block: its `kind` (a key of KINDS) and `children` (adapter names or blocks), with the sizes
    of a split / batch_split (`splits`), the weights of an average (normalized as the reference does) and the
    name a fuse block was given. `path` is the JSON path (or Python call) errors name."""

    def __init__(self, kind: str, children: list[Block | str], path: str = "", splits: list[int] | None = None,
                 weights: list[float] | None = None, name: str | None = None) -> None:
        for child in children:
            if not isinstance(child, str | Block):
                raise UserError(f"{_CLASS_NAMES.get(kind, kind)}(...): a child must be an adapter name or a block "
                                f"such as Stack(\"a\", \"b\"), got {child!r}.")
        self.kind, self.children, self.path = kind, list(children), path
        self.splits: list[int] = list(splits or [])
        self.weights: list[float] = list(weights or [])
        self.given_name = name  # fuse: the name it was given, else None (the fusion is then named by its children)

    def _names(self) -> list[str]:
        names: list[str] = []
        for child in self.children:
            names += child._names() if isinstance(child, Block) else [child]
        return names

    def flatten(self) -> KeysView[str]:
        """The adapter names anywhere in the block, each once, in order of first appearance: iterable in order
        (the compiler's order of adapters) and equal to a set (the reference's `flatten()` returns one)."""
        return dict.fromkeys(self._names()).keys()

    def first(self) -> str:
        child = self.children[0]
        return child.first() if isinstance(child, Block) else child

    def last(self) -> str:
        child = self.children[-1]
        return child.last() if isinstance(child, Block) else child

    @property
    def fusion_name(self) -> str:
        """A fuse block's AdapterFusion: its given name, or the children's (last) adapter names joined by ","."""
        return self.given_name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    @property
    def name(self) -> str | None:
        """As the reference's `Fuse.name`: a fuse block's fusion name; other blocks have none."""
        return self.fusion_name if self.kind == "fuse" else self.given_name

    @property
    def batch_sizes(self) -> list[int]:
        """A batch_split's sizes (the reference's attribute name; stored as `splits`)."""
        return self.splits

    @property
    def parallel_channels(self) -> int:
        return parallel_channels(self)

    def __getitem__(self, key):
        return self.children[key]

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Block) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{_CLASS_NAMES.get(self.kind, self.kind)}[{', '.join(map(str, self.children))}]"

    def to_json(self) -> Any:
        """The spec's JSON form, e.g. {"stack": ["a", {"parallel": ["b", "c"]}]}."""
        data: dict[str, Any] = {self.kind: [c.to_json() if isinstance(c, Block) else c for c in self.children]}
        if self.kind == "split":
            data["splits"] = self.splits
        if self.kind == "batch_split":
            data["batch_sizes"] = self.splits
        if self.kind == "average":  # weights are stored normalized (or as given with normalize_weights=False)
            data.update(weights=self.weights, normalize_weights=False)
        if self.kind == "fuse" and self.given_name:
            data["name"] = self.given_name
        return data


# The reference's constructors (adapters.composition): each only fills in Block's fields.
class Stack(Block):
    def __init__(self, *children: str | Block) -> None:
        super().__init__("stack", list(children), "Stack(...)")


class Parallel(Block):
    def __init__(self, *children: str | Block) -> None:
        super().__init__("parallel", list(children), "Parallel(...)")


class Fuse(Block):
    def __init__(self, *children: str | Block, name: str | None = None) -> None:
        super().__init__("fuse", list(children), "Fuse(...)", name=name)


class Split(Block):
    def __init__(self, *children: str | Block, splits: list[int] | int) -> None:
        sizes = splits if isinstance(splits, list) else [splits] * len(children)
        super().__init__("split", list(children), "Split(...)", splits=sizes)


class BatchSplit(Block):
    def __init__(self, *children: str | Block, batch_sizes: list[int] | int) -> None:
        sizes = batch_sizes if isinstance(batch_sizes, list) else [batch_sizes] * len(children)
        super().__init__("batch_split", list(children), "BatchSplit(...)", splits=sizes)


class Average(Block):
    def __init__(self, *children: str | Block, weights: list[float] | None = None,
                 normalize_weights: bool = True) -> None:
        super().__init__("average", list(children), "Average(...)", weights=_weights(weights, len(children),
                                                                                     normalize_weights))


class MultiTask(Block):
    """Row r of the batch goes through child `task_ids[r]` (pass `task_ids` to the model's forward)."""

    def __init__(self, *children: str | Block) -> None:
        super().__init__("multi_task", list(children), "MultiTask(...)")


CONSTRUCTORS: dict[str, type[Block]] = {"stack": Stack, "parallel": Parallel, "fuse": Fuse, "split": Split,
                                        "batch_split": BatchSplit, "average": Average, "multi_task": MultiTask}
_CLASS_NAMES = {kind: cls.__name__ for kind, cls in CONSTRUCTORS.items()}
KINDS = tuple(CONSTRUCTORS)
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


def _weights(weights: list[float] | None, count: int, normalize: bool, path: str = "Average(...)") -> list[float]:
    """An average's weights as the reference keeps them: 1/n each by default, else normalized to sum 1 unless
    `normalize_weights` is false."""
    if weights is None:
        return [1 / count] * count if count else []
    # NaN or Inf (JSON's NaN/Infinity tokens, or from Python) would reach the graph as constants and poison every
    # output (and TorchScript export); a sum of huge weights overflows to Inf the same way.
    if not all(isinstance(w, int | float) and math.isfinite(w) for w in weights) or (
            normalize and not math.isfinite(sum(weights))):
        raise UserError(f"{path}.weights: expected finite numbers, got {weights!r}; give each child a weight "
                        "such as 0.5.")
    if normalize:
        total = sum(weights) or 1
        weights = [w / total for w in weights]
    return [float(w) for w in weights]


def _build(kind: str, children: list[Block | str], value: dict[str, Any], path: str) -> Block:
    """The block of `kind` for a (checked) JSON object, as an instance of its constructor class (Stack, ...), so
    a parsed setup and one built in Python are alike (isinstance(block, Fuse) holds for both)."""
    sizes = value.get("splits" if kind == "split" else "batch_sizes")
    if isinstance(sizes, int):
        sizes = [sizes] * len(children)
    block = object.__new__(CONSTRUCTORS[kind])  # Block's own __init__: the constructors' signatures lack path
    Block.__init__(block, kind, children, path, sizes if kind in ("split", "batch_split") else None,
                   _weights(value.get("weights"), len(children), value.get("normalize_weights", True), path)
                   if kind == "average" else None,
                   check_name(value["name"], f"{path}.name", "fusion name") if kind == "fuse" and "name" in value
                   else None)
    return block


def from_json(value: Any) -> Block | str:
    """A setup in the spec's JSON form (or a Block) as a Block, without checking names or nesting."""
    if isinstance(value, str | Block):
        return value
    kind = next(k for k in value if k in KINDS)
    return _build(kind, [from_json(c) for c in value[kind]], value, "")


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
    if kind in ("split", "batch_split"):
        key = "splits" if kind == "split" else "batch_sizes"
        sizes = value.get(key)
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = [sizes] * len(children)
        if not isinstance(sizes, list) or len(sizes) != len(children) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            raise UserError(f"{path}.{key}: expected one positive integer per child ({len(children)}) or one "
                            "integer for all.")
    elif kind == "average" and value.get("weights") is not None:
        weights = value["weights"]
        if not isinstance(weights, list) or len(weights) != len(children) or not all(
                isinstance(w, int | float) and not isinstance(w, bool) for w in weights):
            raise UserError(f"{path}.weights: expected one number per child ({len(children)}).")
        if not isinstance(value.get("normalize_weights", True), bool):
            raise UserError(f"{path}.normalize_weights: expected true or false.")
    return _build(kind, children, value, path)


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
    from torch.export import Dim  # this module stays torch-free (spec parsing, the CLI's checks); torch here only

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

