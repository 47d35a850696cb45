"""ReFT interventions (LoReFT, NoReFT, DiReFT): the "reft" method (fxadapt.methods.base.Method).

    module.py   Config, PRESETS, the intervention modules, wire, site_modules, emit (formulas: its docstring)
    site.py     lower_reft: ReFT under a composition setup
"""

from __future__ import annotations

from .module import (
                     ALIASES,
                     BLOCKS,
                     NAME,
                     PRESETS,
                     Config,
                     HouseholderWeight,
                     OrthogonalProjection,
                     ReftModule,
                     ReftUnit,
                     composition_refusal,
                     emit,
                     reference_module,
                     site_modules,
                     wire,
)
from .site import lower_reft

# Composed sites of this family's kind -> (stage, lowerer): stage 0, before the residual sites (site.py says why).
LOWERERS = {"reft": (0, lower_reft)}

__all__ = ["ALIASES", "BLOCKS", "LOWERERS", "NAME", "PRESETS", "Config", "HouseholderWeight", "OrthogonalProjection",
           "ReftModule", "ReftUnit", "composition_refusal", "emit", "reference_module", "site_modules", "wire"]
