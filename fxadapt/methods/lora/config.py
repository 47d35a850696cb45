"""The LoRA method's config: AdapterHub's LoRAConfig (IA3Config, VeraConfig, DoRAConfig are the same class
with other defaults), its presets and the composition blocks it may join. `Config.variant` says which family
member (LoRA, (IA)^3, VeRA, DoRA, DVoRA) a config builds; emit.py builds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base import MethodConfig, require_type

NAME = "lora"
INIT_WEIGHTS = ("lora", "bert", "ia3", "vera")
# The reference's LoRALinear.supported_compositions (its fused LoRAMergedLinear composes in no block).
BLOCKS: tuple[str, ...] = ("stack", "batch_split", "average", "parallel", "multi_task")


@dataclass
class Config(MethodConfig):
    """AdapterHub's LoRAConfig (also IA3Config, VeraConfig, DoRAConfig: same class, other defaults)."""

    architecture = "lora"
    combine_strategies = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list[int] = field(default_factory=list)
    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    attn_matrices: list[str] = field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    dtype: str | None = None

    def validate(self, path: str) -> None:
        for key in ("selfattn_lora", "intermediate_lora", "output_lora", "use_gating", "use_dora"):
            require_type(self, path, key, (bool,))
        require_type(self, path, "r", (int,))
        if self.r <= 0:
            raise self.fail(path, "r", f"the rank must be a positive integer, got {self.r}.")
        require_type(self, path, "alpha", (int, float))
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        bad = [m for m in self.attn_matrices if m not in ("q", "k", "v")]
        if bad:
            raise self.fail(path, "attn_matrices", f"unknown matrices {bad}; use a subset of ['q', 'k', 'v'].")
        if self.init_weights not in INIT_WEIGHTS:
            raise self.fail(path, "init_weights", f"expected one of {list(INIT_WEIGHTS)}, got {self.init_weights!r}.")
        if self.composition_mode not in ("add", "scale"):
            raise self.fail(path, "composition_mode", f"expected \"add\" (LoRA) or \"scale\" ((IA)^3), got "
                            f"{self.composition_mode!r}.")
        for key in ("vera_d", "vera_b"):
            value = getattr(self, key)
            # The reference takes VeRA only for float values (an int silently gives plain LoRA); be explicit.
            if value is not None and (isinstance(value, bool) or not isinstance(value, float)):
                raise self.fail(path, key, f"must be a float such as 0.1 (or null), got {value!r}.")
        if (self.vera_d is None) != (self.vera_b is None):
            raise self.fail(path, "vera_b" if self.vera_b is None else "vera_d", "VeRA needs both vera_d and vera_b "
                            "(the reference's defaults are 0.1 and 0.0); set both or neither.")
        if self.composition_mode == "scale":
            # The reference's IA3 module asserts these; say which field to change instead.
            if self.r != 1:
                raise self.fail(path, "r", f"composition_mode \"scale\" ((IA)^3) scales by a vector, so r must be 1, "
                                f"got {self.r}.")
            if self.dropout > 0:
                raise self.fail(path, "dropout", "composition_mode \"scale\" ((IA)^3) does not support dropout; "
                                "set it to 0.")
            if self.use_dora:
                raise self.fail(path, "use_dora", "DoRA needs composition_mode \"add\".")
            if self.vera_d is not None:
                raise self.fail(path, "vera_d", "VeRA needs composition_mode \"add\"; remove vera_d/vera_b.")
            if self.init_weights == "vera":
                raise self.fail(path, "init_weights", "(IA)^3 initialises with \"ia3\", \"bert\" or \"lora\".")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def variant(self) -> str:
        """Which family member this config builds (the reference's choice in LoRALayer.add_adapter)."""
        if self.composition_mode == "scale":
            return "ia3"
        if self.vera_d is not None:
            return "dvora" if self.use_dora else "vera"
        return "dora" if self.use_dora else "lora"


_IA3 = dict(selfattn_lora=True, intermediate_lora=True, output_lora=False, r=1, alpha=1, attn_matrices=["k", "v"],
            composition_mode="scale", init_weights="ia3")
_VERA = dict(r=8, vera_d=0.1, vera_b=0.0, init_weights="vera")
PRESETS: dict[str, dict[str, Any]] = {"lora": {}, "ia3": _IA3, "vera": _VERA, "dora": dict(use_dora=True),
                                      "dvora": dict(_VERA, use_dora=True)}
ALIASES: dict[str, str] = {}
