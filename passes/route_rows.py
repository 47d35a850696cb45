"""Optimization pass: route rows with gathered weights. A composed site whose setup is `{"multi_task": [a, b,
...]}` of single adapters runs every child on all rows and keeps row r's child (cost grows with N); it becomes
one routed module holding the children's weights stacked [N + 1, ...] (slot N: no adapter), gathered per row
by `task_ids` and applied with batched matmuls, so the cost no longer grows with N:

    LoRA family (methods/lora/route.py)        y'[r] = g[k] ⊙ y[r] + B[k] (A[k] x[r]) + c[k]
    bottleneck  (methods/bottleneck/route.py)  u[r]  = act(t[r] Wd[k]^T + bd[k]) Wu[k]^T + bu[k]
    k = slot(task_ids[r]): task_ids[r] for a child, N for -1 (no adapter)

Each method family declares which composed-site class it routes and how (`ROUTERS = {site class: router}`,
methods/base.py); this pass never learns a method's name. A router returns (routed module, call args) or the
reason it leaves the site alone (a child that is a block, a gated module, children whose pre/post steps differ);
reasons are recorded in `gm.meta["fxadapt"]["not_routed"]`. Stacked weights are new tensors computed once (as
merge_lora's folds), so the unrouted graph and the AdaptedModel's adapters are untouched.
"""

from __future__ import annotations

from torch import fx

from fxadapt import meta
from fxadapt.graph_edit import Emitter, add_module, slug
from fxadapt.methods import BY_ARCHITECTURE

from .manager import PassResult

PASS = "route_rows"

# Composed-site class -> router(gm, node, module) -> (module, args) | reason, from every registered family.
ROUTERS = {cls: router for method in BY_ARCHITECTURE.values() for cls, router in getattr(method, "ROUTERS", {}).items()}


def route_rows(gm: fx.GraphModule) -> PassResult:
    routed: dict[str, str] = {}  # composed site path -> routed module path (a site called at several nodes)
    skipped: list[dict] = []
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        router = ROUTERS.get(type(module))
        if router is None:
            continue
        made = router(gm, node, module)
        if isinstance(made, str):
            skipped.append({"module": node.target, "reason": made})
            continue
        new_module, args = made
        if node.target not in routed:
            routed[node.target] = add_module(gm, "routed", slug(node.target.rpartition(".")[2]), new_module.eval())
        origin = dict(node.meta.get(meta.ORIGIN) or {})
        origin.update({"method": "routed", "pass": PASS})
        emit = Emitter(gm, node, origin)
        new = emit.call_module(routed[node.target], args)
        emit.reroute(node, new)
        gm.graph.erase_node(node)
        count += 1
    if skipped:
        gm.meta.setdefault("fxadapt", {})["not_routed"] = skipped
    if count:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return PassResult(gm, count)
