"""LoRA-family adapters under a composition setup: `lower_linear` calls one LoRASite (site.py) at every graph node
of a composed projection; it has the signature of the lowerers passes/lower_composition.py gathers (LOWERERS)."""

from __future__ import annotations

from torch import fx

from ...composition import Block
from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...sites import SiteMap
from ..base import Placement, SiteModule, freeze
from .family import projection_io, weight_and_bias
from .site import LoRASite

PASS = "lower_composition"


def lower_linear(gm: fx.GraphModule, spec, sites: SiteMap, paths: list, index: int,
                  modules: dict[str, SiteModule], shared: dict[str, tuple[fx.Node, ...]]
                  ) -> tuple[int, list[Placement]]:
    """`y' = LoRASite(x, y[, task_ids][, W, b], *shared)` at every graph node of one projection (see LoRASite);
    returns (nodes made, placements)."""
    site = sites.linears[index]
    if site.in_features != site.out_features and any(_chains(branch, modules) for branch in paths):
        raise UserError(f"{spec.setup.path}: a stack feeds each LoRA-family adapter's update into the next one's "
                        "input (as the reference does), which needs a square projection, but "
                        f"{site.module} ({site.role}, layer {site.layer}) maps {site.in_features} -> "
                        f"{site.out_features} features; the reference fails there too. Stack adapters that adapt "
                        "different projections (e.g. attn_matrices only), or use parallel or average.")
    task_ids = _task_ids(gm) if _has_multi_task(spec.setup) else None
    uses = {n: shared[n] for n in modules if n in shared}
    module = LoRASite(paths, {n: m.module for n, m in modules.items()}, task_ids is not None,
                      {n: len(nodes) for n, nodes in uses.items()})
    path = add_module(gm, "composition", f"L{site.layer}_{site.role}", freeze(module))
    origin = {"adapter": ",".join(modules), "method": "composition", "pass": PASS, "site": site.role,
              "layer": site.layer}
    inserted = 0
    for node in site.nodes:
        x, y = projection_io(node, True)
        emit = Emitter(gm, y, origin)
        inputs = ((task_ids,) if task_ids is not None else ()) + (weight_and_bias(node) if module.needs_weight else ())
        out = emit.call_module(path, (x, y, *inputs, *[a for nodes in uses.values() for a in nodes]))
        emit.reroute(y, out)
        inserted += len(emit.created)
    placements = [Placement(n, spec.adapters[n].method.NAME, site.role, site.layer, f"{path}.adapters.{n}",
                            m.reference_module, 0) for n, m in modules.items()]
    return inserted, placements


def _chains(setup: Block | str, present: dict) -> bool:
    """Whether a stack in `setup` runs two or more of the adapters `present` at a site one after the other."""
    if isinstance(setup, str):
        return False
    if setup.kind == "stack":
        acting = [c for c in setup.children if any(n in present for n in ([c] if isinstance(c, str) else c.flatten()))]
        if len(acting) > 1:
            return True
    return any(_chains(child, present) for child in setup.children if isinstance(child, Block))


def _has_multi_task(block: Block) -> bool:
    return block.kind == "multi_task" or any(isinstance(c, Block) and _has_multi_task(c) for c in block.children)


def _task_ids(gm: fx.GraphModule) -> fx.Node:
    node = next((n for n in (n for n in gm.graph.nodes if n.op == "placeholder") if n.name == "task_ids"), None)
    if node is None:
        raise UserError("$.active: a multi_task block needs a per-row \"task_ids\" model input; compile with "
                        "task_ids among the inputs.")
    return node
