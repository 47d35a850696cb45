"""The bottleneck family: seq_bn, double_seq_bn, par_bn, Compacter, invertible adapters, AdapterPlus (one method,
"bottleneck", picked by config), and AdapterFusion, which fuses bottleneck adapters at their residual sites.

    config.py           Config (AdapterHub's BnConfig), PRESETS, ALIASES, BLOCKS
    module.py           Bottleneck: the block, its pre_forward / run / post_forward (the formulas)
    phm.py              Compacter's PHM layers and shared PHM tensors
    invertible.py       the invertible block after the embeddings (inv_adapter)
    emit.py             reference_module, site_modules, emit (the single-adapter rewrite), composition_refusal
    site.py             BottleneckSite + lower_residual: one residual site under a composition setup
    route.py            RoutedBottleneck: a multi_task BottleneckSite with the children's weights stacked (ROUTERS)
    slot.py             SLOT: how bottleneck adapters share a swappable model's padded slot
    invertible_site.py  lower_invertible: the setup's invertible block
    fusion.py           Fusion: AdapterFusion's module (its config and loading: compose/fusion_spec.py)

This package is the "bottleneck" method (fxadapt.methods.base.Method): the names below are its contract.
"""

from __future__ import annotations

from .config import ALIASES, BLOCKS, INITS, NAME, PRESETS, Config
from .emit import composition_refusal, emit, reference_module, site_modules
from .invertible_site import lower_invertible
from .module import Bottleneck
from .route import route_residual
from .site import BottleneckSite, lower_residual
from .slot import SLOT


def describe_sites(config: Config) -> str:
    """The sites this config needs, for insert_adapters' "no site for this adapter" error."""
    return "residual adds after " + " and ".join(
        (["attention"] if config.mh_adapter else []) + (["the FFN"] if config.output_adapter else []))


# Composed sites of this family's kinds (SiteModule.kind) -> (stage, lowerer); see Method.LOWERERS.
LOWERERS = {"invertible": (0, lower_invertible), "residual": (1, lower_residual)}
# Composed-site class -> its router for passes/route_rows.py (per-row gathered weights); see Method.ROUTERS.
ROUTERS = {BottleneckSite: route_residual}
# Adapters of this method may be fused (a Fuse block, compose/fusion_spec.py).
FUSABLE = True

__all__ = ["ALIASES", "BLOCKS", "INITS", "LOWERERS", "NAME", "PRESETS", "ROUTERS", "SLOT", "Bottleneck", "Config",
           "FUSABLE", "composition_refusal", "describe_sites", "emit", "reference_module", "site_modules"]
