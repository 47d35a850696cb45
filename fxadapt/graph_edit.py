"""Small, metadata-preserving graph edits shared by the method emitters."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import fx, nn

from . import meta


def slug(text: str) -> str:
    """A valid attribute name for an adapter or site name (`sentiment@ukp` -> `sentiment_ukp`)."""
    cleaned = re.sub(r"\W", "_", text)
    return cleaned if cleaned and not cleaned[0].isdigit() else "_" + cleaned


def add_module(gm: fx.GraphModule, adapter: str, site: str, module: nn.Module) -> str:
    """Register an adapter module under `fxadapt.<adapter>.<site>` and return its path."""
    path = f"fxadapt.{slug(adapter)}.{slug(site)}"
    gm.add_submodule(path, module)
    return path


class Emitter:
    """Creates nodes after an anchor, in order, each inheriting the anchor's metadata plus its origin."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, origin: dict[str, object]) -> None:
        self.graph = gm.graph
        self.anchor = anchor
        self.cursor = anchor
        self.origin = origin
        self.created: list[fx.Node] = []

    def _place(self, node: fx.Node, keep_val: bool) -> fx.Node:
        meta.inherit_meta(node, self.anchor, keep_val=keep_val, **self.origin)
        self.created.append(node)
        self.cursor = node
        return node

    def call_function(self, target, args: tuple, kwargs: dict | None = None, keep_val: bool = True) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            return self._place(self.graph.call_function(target, args, kwargs or {}), keep_val)

    def call_module(self, path: str, args: tuple, keep_val: bool = True) -> fx.Node:
        with self.graph.inserting_after(self.cursor):
            return self._place(self.graph.call_module(path, args), keep_val)

    def copy(self, node: fx.Node, replace: dict[fx.Node, fx.Node]) -> fx.Node:
        """A copy of `node` (e.g. the model's own LayerNorm) with some inputs replaced."""
        args = fx.node.map_arg(node.args, lambda n: replace.get(n, n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: replace.get(n, n))
        with self.graph.inserting_after(self.cursor):
            new = self.graph.call_function(node.target, args, kwargs)
        for key, value in node.meta.items():
            if key not in (meta.SITE, meta.ORIGIN):
                new.meta[key] = value
        new.meta[meta.ORIGIN] = dict(self.origin)
        self.created.append(new)
        self.cursor = new
        return new

    def reroute(self, old: fx.Node, new: fx.Node, keep: Iterable[fx.Node] = ()) -> None:
        """Make every consumer of `old` read `new`, except the nodes just created and `keep`."""
        spare = set(self.created) | set(keep)
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in spare)


def shared_attrs(gm: fx.GraphModule, targets: tuple[str, ...], origin: dict) -> tuple[fx.Node, ...]:
    """get_attr nodes for shared parameters, placed after the graph's existing get_attr nodes."""
    if not targets:
        return ()
    last = None
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            last = node
        elif node.op not in ("placeholder",):
            break
    created = []
    for target in targets:
        context = gm.graph.inserting_after(last) if last is not None else gm.graph.inserting_before(
            next(n for n in gm.graph.nodes if n.op != "placeholder"))
        with context:
            node = gm.graph.get_attr(target)
        node.meta[meta.ORIGIN] = dict(origin)
        created.append(node)
        last = node
    return tuple(created)


def stored_tensor(gm: fx.GraphModule, node: object) -> torch.Tensor | None:
    """The (detached) tensor a get_attr node reads, or None for anything else (a computed value, a constant)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part)
    return value.detach()
