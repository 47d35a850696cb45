"""Optimization pass: fold LoRA into the projection weights, leaving no LoRA nodes.

    y = W x + b + (alpha/r)·B A x   ==>   y = W' x + b,  W' = W + (alpha/r)·B·A

(transposed for Conv1D's `addmm` layout, zero rows for disabled chunks of a fused q/k/v). A weight is
merged only when every projection that reads it carries the same LoRA, since changing a shared
weight would alter the others; the merged weight is a new tensor, so the unmerged graph's weights
stay intact. The projection node records the merge in `meta.MERGED`.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxadapt import meta
from fxadapt.graph_ops import ADD, ADDMM, is_call, weight_node
from fxadapt.methods.lora import LoRA

from .manager import PassResult


def _lora_applications(gm: fx.GraphModule) -> dict[str, list[tuple[fx.Node, fx.Node, fx.Node]]]:
    """weight target -> [(projection, lora call, add)] for every `add(proj, lora(x_proj))` pattern."""
    found: dict[str, list[tuple[fx.Node, fx.Node, fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), LoRA):
            continue
        adds = [u for u in node.users if is_call(u, ADD)]
        if len(node.users) != 1 or not adds:
            continue
        add = adds[0]
        projection = add.args[0] if add.args[1] is node else add.args[1]
        weight = weight_node(projection) if isinstance(projection, fx.Node) else None
        x = projection.args[1 if is_call(projection, ADDMM) else 0] if weight is not None else None
        if weight is None or node.args[0] is not x:
            continue
        found.setdefault(weight.target, []).append((projection, node, add))
    return found


def merge_lora(gm: fx.GraphModule) -> PassResult:
    merged = 0
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        w = weight_node(node)
        if w is not None:
            uses[w.target] = uses.get(w.target, 0) + 1
    for target, applications in _lora_applications(gm).items():
        projections = {p for p, _, _ in applications}
        modules = {lora.target for _, lora, _ in applications}
        if len(projections) != uses.get(target, 0) or len(applications) != len(projections) * len(modules):
            continue  # a projection reads this weight without (all) the same LoRAs: merging would change it
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        weight = getattr(owner, leaf)
        delta = sum(gm.get_submodule(m).delta_weight() for m in sorted(modules))
        with torch.no_grad():
            first = next(iter(projections))
            new = weight + (delta.t() if is_call(first, ADDMM) else delta).to(weight.dtype)
        setattr(owner, leaf, nn.Parameter(new.detach(), requires_grad=False))
        for projection, lora, add in applications:
            origin = lora.meta.get(meta.ORIGIN, {})
            projection.meta.setdefault(meta.MERGED, []).append(
                {"adapter": origin.get("adapter"), "method": origin.get("method"), "pass": "merge_lora"})
            add.replace_all_uses_with(projection)
            gm.graph.erase_node(add)
            gm.graph.erase_node(lora)
        merged += len(modules)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return PassResult(gm, merged)
