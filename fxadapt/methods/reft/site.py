"""ReFT under a composition setup. The reference's ReftLayer is not composable: at every layer output it runs
the intervention of the setup's *first* adapter, if that is a ReFT adapter, and nothing else:

    Stack(r, s, b):  h' = r(h) at r's layers; s is kept (its checkpoint loads) but not called; b acts at its
                     own residual sites, before r reads the layer output
    Stack(b, r):     no intervention (b is the first adapter)

`lower_reft` has the signature of the lowerers passes/lower_composition.py gathers (LOWERERS); it runs before the
residual sites are lowered, so a composed bottleneck site at the same layer output feeds the intervention.
"""

from __future__ import annotations

from torch import fx

from ...graph_edit import add_module
from ...sites import SiteMap
from ..base import Placement, SiteModule
from . import module as reft

PASS = "lower_composition"


def lower_reft(gm: fx.GraphModule, spec, sites: SiteMap, paths: list, index: int,
               modules: dict[str, SiteModule], shared: dict) -> tuple[int, list[Placement]]:
    first = spec.setup.first()
    site = sites.residual("residual.ffn", index)
    inserted, placements = 0, []
    for name, item in modules.items():
        path = add_module(gm, name, f"L{index}_reft", item.module)
        count = reft.wire(gm, site, path, spec.adapters[name].config, name, PASS)[0] if name == first else 0
        inserted += count
        placements.append(Placement(name, reft.NAME, "layer.output", index, path, item.reference_module, count))
    return inserted, placements
