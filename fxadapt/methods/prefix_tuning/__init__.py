"""Prefix tuning, the "prefix_tuning" method (fxadapt.methods.base.Method), and prompt tuning (prompt_tuning.py,
method "prompt_tuning"): both lengthen what attention sees by learned positions.

    module.py         Config, PRESETS, the prefix modules and pools, site_modules, emit (formulas: its docstring)
    site.py           PrefixSite + lower_prefix: prefix tuning under a composition setup
    slot.py           SLOT: prefixes in a swappable model (padded to the longest, with a mask the files carry)
    prompt_tuning.py  the prompt tuning method (soft prompt tokens before the input embeddings)
"""

from __future__ import annotations

from .module import (
                     ALIASES,
                     BLOCKS,
                     LOCATIONS,
                     NAME,
                     POOL_KEY,
                     PRESETS,
                     Config,
                     FlatPrefixTuning,
                     PrefixGroup,
                     PrefixTuning,
                     aliases,
                     attention_cores,
                     composition_refusal,
                     emit,
                     extend_mask,
                     groups,
                     make_group,
                     site_modules,
)
from .site import lower_prefix
from .slot import SLOT

# Composed sites of this family's kind -> (stage, lowerer); see Method.LOWERERS.
LOWERERS = {"prefix": (1, lower_prefix)}

__all__ = ["ALIASES", "BLOCKS", "LOCATIONS", "LOWERERS", "NAME", "POOL_KEY", "PRESETS", "SLOT", "Config",
           "FlatPrefixTuning", "PrefixGroup", "PrefixTuning", "aliases", "attention_cores", "composition_refusal",
           "emit", "extend_mask", "groups", "make_group", "site_modules"]
