"""The "lora" method's swappable-slot rule (methods/slot_rule.py): plain LoRA (gated or not) and (IA)^3 fill a
padded slot, their scaling folded into `lora_B`; VeRA, DoRA and DVoRA keep a slot of their own (VeRA's shared
random matrices differ per adapter; DoRA's row norm is over the unscaled B A)."""

from __future__ import annotations

from dataclasses import replace

from ..slot_rule import SlotRule
from .config import Config

PADDABLE_VARIANTS = ("lora", "ia3")


def shareable(config: Config) -> bool:
    return config.variant in PADDABLE_VARIANTS


def scaling(config: Config, module: str) -> float:
    """s of y' = y + s·B A x; (IA)^3 multiplies its vector l by alpha; a gated LoRA's gate is its scaling."""
    if config.use_gating:
        return 1.0
    return float(config.alpha if config.variant == "ia3" else config.scaling)


def refusal(config: Config) -> str | None:
    if config.composition_mode == "scale" and config.use_gating:
        return "a gated (IA)^3 scale g·l is 1 for no value of l (g depends on the input)"
    return None


def widen(configs: list[Config]) -> Config:
    """The largest rank, with alpha = r (scaling 1)."""
    rank = max(c.r for c in configs)
    return replace(configs[0], r=rank, alpha=rank)


SLOT = SlotRule(free=("r", "alpha", "dropout", "init_weights", "init_weights_seed"),
                sites=("selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "attn_matrices"),
                fold=("lora_B",), shareable=shareable, scaling=scaling, widen=widen,
                refusal=refusal)
