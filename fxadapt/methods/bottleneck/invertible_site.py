"""Invertible adapters (MAD-X's coupling block after the embeddings, its inverse before the LM head) under a
composition setup. As in the reference's InvertibleAdapterLayer, only the block of the setup's *first*
adapter runs, for every row and every block kind (Stack, Parallel, Fuse, Split, BatchSplit, Average):

    e' = INV_first(e)   after the embeddings;   z' = INV_first⁻¹(z)   before the LM head

The other adapters' blocks are kept (their checkpoints load and save) but not called. `lower_invertible` has the
signature of the lowerers passes/lower_composition.py gathers (LOWERERS).
"""

from __future__ import annotations

from torch import fx

from ...graph_edit import add_module
from ...sites import SiteMap
from ..base import Placement, SiteModule
from . import invertible

PASS = "lower_composition"


def lower_invertible(gm: fx.GraphModule, spec, sites: SiteMap, paths: list, index: int,
                     modules: dict[str, SiteModule], shared: dict) -> tuple[int, list[Placement]]:
    first = spec.setup.first()
    inserted, placements = 0, []
    for name, item in modules.items():
        path = add_module(gm, name, "invertible", item.module)
        count = invertible.wire(gm, sites, name, path, PASS) if name == first else 0
        inserted += count
        placements.append(Placement(name, invertible.METHOD, "embeddings", -1, path, item.reference_module, count))
    return inserted, placements
