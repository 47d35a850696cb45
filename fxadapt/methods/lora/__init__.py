"""The LoRA family: LoRA, gated LoRA, (IA)^3, VeRA, DoRA and DVoRA (one method, "lora", picked by config),
plus MTL-LoRA (mtl.py, method "mtl_lora") and PEFT LoRA/DoRA checkpoints (peft.py, method "peft_lora").

    config.py   Config (AdapterHub's LoRAConfig), PRESETS, ALIASES, BLOCKS
    family.py   FamilyModule: how a module meets its projection (add / scale / replace), fold for merging
    module.py   LoRA; ia3.py, vera.py, dora.py: the variants (they import module.py / family.py only)
    emit.py     targets, build (picks the variant), emit, site_modules, composition_refusal
    site.py     LoRASite: one projection under a composition block of family modules
    lower.py    lower_linear: a composed projection calls its LoRASite (LOWERERS)
    route.py    RoutedLinear: a multi_task LoRASite with the children's weights stacked (ROUTERS)
    slot.py     SLOT: how LoRA / (IA)^3 adapters share a swappable model's padded slot
    peft.py, mtl.py   the two other methods of the family

This package is the "lora" method (fxadapt.methods.base.Method): the names below are its contract.
"""

from __future__ import annotations

from ...graph_edit import shared_attrs
from .config import ALIASES, BLOCKS, INIT_WEIGHTS, NAME, PRESETS, Config
from .emit import build, composition_refusal, emit, site_modules, targets
from .family import FamilyModule, apply_at, gate_mean, projection_io, weight_and_bias
from .lower import lower_linear
from .module import LoRA
from .route import route_linear
from .site import LoRASite
from .slot import SLOT

# Composed sites of this family's kind (SiteModule.kind) -> (stage, lowerer); see Method.LOWERERS.
LOWERERS = {"linear": (1, lower_linear)}
# Composed-site class -> its router for passes/route_rows.py (per-row gathered weights); see Method.ROUTERS.
ROUTERS = {LoRASite: route_linear}

# The variants PEFT's LoraConfig can express (saving writes its layout beside AdapterHub's for them).
PEFT_LAYOUT_VARIANTS = ("lora",)


def peft_layout(config: Config) -> bool:
    """Whether this config's adapter can be saved in PEFT's layout too (plain, ungated LoRA)."""
    return config.variant in PEFT_LAYOUT_VARIANTS and not config.use_gating


def describe_sites(config: Config) -> str:
    """The sites this config needs, for insert_adapters' "no site for this adapter" error."""
    return "attention projections " + "/".join(config.attn_matrices) + " or FFN projections"


__all__ = ["ALIASES", "BLOCKS", "INIT_WEIGHTS", "LOWERERS", "NAME", "PRESETS", "ROUTERS", "SLOT", "Config",
           "FamilyModule", "LoRA", "apply_at", "build", "composition_refusal", "describe_sites", "emit", "gate_mean",
           "peft_layout", "projection_io", "shared_attrs", "site_modules", "targets", "weight_and_bias"]
