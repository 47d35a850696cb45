"""Composition blocks for the Python API, named and built as in AdapterHub `adapters` 1.3.0
(`adapters.composition`):

    model.set_active_adapters(Stack("a", Parallel("b", "c")))
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic", set_active=True)
    model.set_active_adapters(Average("a", "b", weights=[0.3, 0.7]))

A block is a sequence of its children (adapter names or blocks). Validation (known adapters, the
reference's nesting and depth rules, which methods a block may hold) happens when a setup is activated,
as in the reference; `to_json()` gives the spec's form of `"active"` (fxadapt/composition.py), which the
model parses. `model.active_adapters` returns blocks of these classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import UserError


class AdapterCompositionBlock(Sequence):
    """Base class: `children` are adapter names or blocks."""

    kind = ""

    def __init__(self, *children: str | AdapterCompositionBlock) -> None:
        for child in children:
            if not isinstance(child, str | AdapterCompositionBlock):
                raise UserError(f"{type(self).__name__}(...): a child must be an adapter name or a block such as "
                                f"Stack(\"a\", \"b\"), got {child!r}.")
        self.children: list[str | AdapterCompositionBlock] = list(children)

    def __getitem__(self, key):
        return self.children[key]

    def __len__(self) -> int:
        return len(self.children)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}[{', '.join(map(str, self.children))}]"

    def first(self) -> str:
        child = self.children[0]
        return child.first() if isinstance(child, AdapterCompositionBlock) else child

    def last(self) -> str:
        child = self.children[-1]
        return child.last() if isinstance(child, AdapterCompositionBlock) else child

    def flatten(self) -> set[str]:
        """The adapter names anywhere in the block (a set, as the reference's)."""
        names: set[str] = set()
        for child in self.children:
            names |= child.flatten() if isinstance(child, AdapterCompositionBlock) else {child}
        return names

    @property
    def parallel_channels(self) -> int:
        return max((c.parallel_channels if isinstance(c, AdapterCompositionBlock) else 1 for c in self.children),
                   default=1)

    def _extra(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        """The spec's JSON form, e.g. {"stack": ["a", {"parallel": ["b", "c"]}]}."""
        children = [c.to_json() if isinstance(c, AdapterCompositionBlock) else c for c in self.children]
        return {self.kind: children, **self._extra()}


class Stack(AdapterCompositionBlock):
    kind = "stack"


class Parallel(AdapterCompositionBlock):
    kind = "parallel"

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Fuse(AdapterCompositionBlock):
    kind = "fuse"

    def __init__(self, *children: str | AdapterCompositionBlock, name: str | None = None) -> None:
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        """The fusion's name: given, or the children's (last) adapter names joined by ","."""
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def _extra(self) -> dict[str, Any]:
        return {"name": self._name} if self._name else {}


class Split(AdapterCompositionBlock):
    kind = "split"

    def __init__(self, *children: str | AdapterCompositionBlock, splits: list[int] | int) -> None:
        super().__init__(*children)
        self.splits = splits if isinstance(splits, list) else [splits] * len(children)

    def _extra(self) -> dict[str, Any]:
        return {"splits": self.splits}


class BatchSplit(AdapterCompositionBlock):
    kind = "batch_split"

    def __init__(self, *children: str | AdapterCompositionBlock, batch_sizes: list[int] | int) -> None:
        super().__init__(*children)
        self.batch_sizes = batch_sizes if isinstance(batch_sizes, list) else [batch_sizes] * len(children)

    def _extra(self) -> dict[str, Any]:
        return {"batch_sizes": self.batch_sizes}


class Average(AdapterCompositionBlock):
    kind = "average"

    def __init__(self, *children: str | AdapterCompositionBlock, weights: list[float] | None = None,
                 normalize_weights: bool = True) -> None:
        super().__init__(*children)
        if weights is None:
            self.weights = [1 / len(children)] * len(children) if children else []
        elif normalize_weights:  # as the reference: normalized once, here
            total = sum(weights) if weights else 1
            self.weights = [w / total for w in weights]
        else:
            self.weights = list(weights)

    def _extra(self) -> dict[str, Any]:
        return {"weights": self.weights, "normalize_weights": False}  # already normalized


class MultiTask(AdapterCompositionBlock):
    """Row r of the batch goes through child `task_ids[r]` (pass `task_ids` to the model's forward)."""

    kind = "multi_task"


BLOCKS: dict[str, type[AdapterCompositionBlock]] = {
    cls.kind: cls for cls in (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)}


def from_json(value: Any) -> str | AdapterCompositionBlock:
    """A parsed setup (fxadapt.composition.Block, or its JSON form) as user-facing blocks."""
    if hasattr(value, "to_json") and not isinstance(value, AdapterCompositionBlock):
        value = value.to_json()
    if isinstance(value, str | AdapterCompositionBlock):
        return value
    kind = next(k for k in value if k in BLOCKS)
    children = [from_json(c) for c in value[kind]]
    if kind == "fuse":
        return Fuse(*children, name=value.get("name"))
    if kind == "split":
        return Split(*children, splits=value["splits"])
    if kind == "batch_split":
        return BatchSplit(*children, batch_sizes=value["batch_sizes"])
    if kind == "average":
        return Average(*children, weights=value.get("weights"), normalize_weights=False)
    return BLOCKS[kind](*children)


__all__ = ["AdapterCompositionBlock", "Average", "BatchSplit", "Fuse", "MultiTask", "Parallel", "Split", "Stack"]
