"""How much work a graph does, in operations and matrix products, for reports of what an optimization saved.

Counted at the FX graph's level: one per call node (placeholders, outputs, get_attr and `getattr` are free;
`operator.getitem` of a multi-output op is free too, as ONNX's Split has several outputs). An adapter's
`call_module` node is expanded by symbolic tracing of its module (torch.nn layers count as one op each,
`nn.Linear` as a product). A module that does not trace counts as one op with one product per weight matrix
(each is used once per call in the adapter families), and the counts say `"estimated": true`.
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from fxadapt import meta
from fxadapt.graph_ops import ADDMM, LINEAR, MATMUL, aten

PRODUCTS = LINEAR | ADDMM | MATMUL | {aten.mm.default, aten.baddbmm.default, F.linear, torch.matmul, torch.mm,
                                      torch.bmm, torch.einsum, operator.matmul}
FREE = {operator.getitem, builtins.getattr}


class _Tracer(fx.Tracer):
    """Traces through nn.Identity (LoRA's dropout at p=0), which does nothing at run time."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return not isinstance(m, nn.Identity) and super().is_leaf_module(m, module_qualified_name)


class _Call(nn.Module):
    """`forward(*args)` around a module: fx then makes one placeholder per argument, so modules whose own
    forward takes `*inputs` (the composed sites) trace too."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return self.inner(*args)


def _module_counts(module: nn.Module, arity: int) -> tuple[int, int, bool]:
    """(ops, products, estimated) of one call of `module` with `arity` arguments."""
    root = _Call(module)
    try:
        graph = _Tracer().trace(root, concrete_args=tuple(fx.PH for _ in range(arity)))
    except Exception:  # noqa: BLE001 - any trace failure (data-dependent control flow, ...) falls back to an estimate
        weights = sum(1 for p in module.parameters() if p.dim() >= 2)
        return 1, weights, True
    ops = products = 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.target in FREE:
            continue
        ops += 1
        if node.op == "call_module":
            products += isinstance(root.get_submodule(node.target), nn.Linear)
        elif node.op == "call_function":
            products += node.target in PRODUCTS
    return ops, products, False


def op_counts(gm: fx.GraphModule) -> dict[str, int | bool]:
    """{"nodes": ops, "matmuls": products[, "estimated": True]} of one forward pass of `gm` (module docstring)."""
    ops = products = 0
    estimated = False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.target in FREE:
            continue
        if node.op == "call_module" and node.meta.get(meta.ORIGIN):
            n, m, guess = _module_counts(gm.get_submodule(node.target), len(node.args))
            ops, products, estimated = ops + n, products + m, estimated or guess
            continue
        ops += 1
        products += node.op == "call_function" and node.target in PRODUCTS
    counts: dict[str, int | bool] = {"nodes": ops, "matmuls": products}
    if estimated:
        counts["estimated"] = True
    return counts
