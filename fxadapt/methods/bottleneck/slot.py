"""The "bottleneck" method's swappable-slot rule (methods/slot_rule.py): plain bottleneck adapters (seq_bn,
double_seq_bn, par_bn, gated, AdapterPlus) with one reduction factor and a numeric scaling fill a padded slot, the
scaling folded into the up-projection; Compacter (PHM factors), invertible adapters, per-layer reduction factors
and a learned scaling keep a slot of their own. All bottleneck slots share their residual sites through one Stack,
exact only where they sit alike around the residual add and the LayerNorm (`layout`)."""

from __future__ import annotations

from dataclasses import replace

from ..slot_rule import SlotRule
from .config import Config

# the fields of a bottleneck config that place it around the residual add and the LayerNorm
RESIDUAL_LAYOUT = ("original_ln_before", "original_ln_after", "residual_before_ln", "is_parallel")


def shareable(config: Config) -> bool:
    return (not config.phm_layer and config.inv_adapter is None and not isinstance(config.reduction_factor, dict)
            and not isinstance(config.scaling, str))


def widen(configs: list[Config]) -> Config:
    """The largest bottleneck (the smallest reduction factor), with scaling 1."""
    return replace(configs[0], reduction_factor=min(c.reduction_factor for c in configs), scaling=1.0)


SLOT = SlotRule(free=("reduction_factor", "scaling", "dropout", "init_weights", "init_weights_seed",
                      "stochastic_depth"),
                sites=("mh_adapter", "output_adapter", "leave_out"), fold=("adapter_up.weight", "adapter_up.bias"),
                shareable=shareable, scaling=lambda config, module: float(config.scaling), widen=widen,
                stacked=True, layout=RESIDUAL_LAYOUT)
