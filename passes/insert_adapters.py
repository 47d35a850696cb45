"""Rewrite pass: insert every active adapter's subgraph at its sites and load checkpoint weights.

Each method module's `emit` does the graph surgery for its method (see its docstring for the
equation); this pass orders adapters as the spec lists them, requires that each found a site, loads
`{"load": DIR}` weights into the inserted modules, and records the placements for checkpoints and
reports in `gm.meta["fxadapt"]`. A spec whose "active" is a composition block is not this pass's: the
lower_composition pass lowers all its adapters together (fxadapt/pass_list.py runs one or the other).
"""

from __future__ import annotations

from torch import fx

from fxadapt.checkpoints.loading import load_into
from fxadapt.errors import UserError
from fxadapt.sites import SiteMap
from fxadapt.spec import Spec

from .manager import PassResult


def insert_adapters(gm: fx.GraphModule, spec: Spec, sites: SiteMap, base_prefix: str = "",
                    hidden_size: int | None = None) -> PassResult:
    if spec.setup is not None:  # a caller bug: pass_list.REWRITE runs lower_composition for a setup
        raise ValueError("insert_adapters: a composition setup is lowered by the lower_composition pass")
    placements = []
    inserted = 0
    for name in spec.active:
        adapter = spec.adapters[name]
        found = list(adapter.method.emit(gm, sites, name, adapter.config, adapter.path))
        if not found:
            available = sorted({s.role for s in sites.linears} | {s.role for s in sites.residuals})
            raise UserError(
                f"{adapter.path}: the model has no site for this {adapter.method.NAME} adapter (it needs "
                f"{_needs(adapter)}); sites found: {', '.join(available) or 'none'}. Check the model, or the "
                "config's placement options (attn_matrices, mh_adapter, output_adapter, leave_out)."
            )
        if adapter.load is not None:
            load_into(gm, found, adapter.load, f"{adapter.path}.load", base_prefix, hidden_size)
        placements += found
        inserted += sum(p.nodes_inserted for p in found)
    gm.meta.setdefault("fxadapt", {})["placements"] = placements
    return PassResult(gm, inserted)


def _needs(adapter) -> str:
    config = adapter.config
    describe = getattr(adapter.method, "describe_sites", None)  # declared by the method (methods/base.py)
    if describe is not None:
        return describe(config)
    return f"the sites {adapter.method.NAME} adapts"
