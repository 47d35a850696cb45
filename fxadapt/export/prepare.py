"""The graph every export format is made from: the rewritten graph with exporter-proof spellings.

    contiguous(x)  ->  clone(x, memory_format=torch.contiguous_format)
    ModelOutput(k=v, ...)  ->  {k: v, ...}          (the graph's returned structure)

Why: under symbolic shapes the ONNX exporter's decomposition treats `contiguous` of a transposed tensor
as a no-op (its strides cannot be decided) and then fails on the `view` that follows (T5's attention
output: transpose -> contiguous -> view -> "Cannot view a tensor with shape ... and strides ...").
torch.export's default decompositions avoid the failure but take ~3x longer and lower ops ONNX has
natively (layer_norm), so they stay the fallback. An explicit contiguous-format copy computes the same
values; ONNX has no strides, so it costs nothing there, and a copy of a contiguous tensor is cheap
elsewhere.

Why plain outputs: a ModelOutput is a pytree node only through transformers' own registration, and
that registration differs by version (4.57 registers no keys function, so `tree_flatten_with_path`
fails on it; 5.x does). A dict of the same fields in the same order flattens the same way everywhere,
and a `.pt2` saved from it loads in a process that never imported transformers.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx

aten = torch.ops.aten


def for_export(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (same parameters and buffers, copied graph) in the spellings above; the rewritten
    graph the user sees is left as it is, and returned as it is when nothing needs changing.
    Returns (graph, contiguous rewrites)."""
    out_spec = _out_spec(gm)
    plain_spec = plain_output_spec(out_spec) if out_spec is not None else None
    contiguous = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.contiguous.default]
    if not contiguous and plain_spec == out_spec:
        return gm, 0
    with warnings.catch_warnings():  # torch's own pytree specs warn about their deprecated LeafSpec on copy
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.contiguous.default:
            node.target = aten.clone.default
            node.kwargs = {"memory_format": torch.contiguous_format}
            count += 1
    if plain_spec != out_spec:
        info = graph._codegen.pytree_info
        graph._codegen.pytree_info = info._replace(out_spec=plain_spec)
    return fx.GraphModule(gm, graph), count


def _out_spec(gm: fx.GraphModule) -> pytree.TreeSpec | None:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    return getattr(info, "out_spec", None)


def plain_output_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """`spec` with every mapping (ModelOutput included) as a dict and every tuple subclass as a tuple,
    leaves in the same order; `spec` itself where the leaf order would change."""
    with warnings.catch_warnings():  # unflattening a ModelOutput of int leaves is harmless
        warnings.simplefilter("ignore")
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    plain = plain_tree(tree)
    leaves, new_spec = pytree.tree_flatten(plain)
    return new_spec if leaves == list(range(spec.num_leaves)) else spec


def plain_tree(tree: Any) -> Any:
    """`tree` with mappings as dicts and tuple subclasses as tuples: containers every pytree version keys."""
    if isinstance(tree, Mapping):
        return {key: plain_tree(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(map(plain_tree, tree)) if type(tree) in (tuple, list) else tuple(map(plain_tree, tree))
    return tree
