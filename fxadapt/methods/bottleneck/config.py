"""The bottleneck method's config (AdapterHub's BnConfig), its presets and aliases; see __init__.py for the
method and module.py for the formulas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from ..activation import make_activation
from ..base import MethodConfig, require_type
from . import invertible, phm

NAME = "bottleneck"
# The reference's BottleneckLayer.supported_compositions, plus multi_task: an fxadapt extension (the
# reference's BottleneckLayer has none); rows are routed per task (site.py).
BLOCKS: tuple[str, ...] = ("stack", "fuse", "split", "parallel", "batch_split", "average", "multi_task")
INITS = ("bert", "mam_adapter", "houlsby")


@dataclass
class Config(MethodConfig):
    """AdapterHub's BnConfig. Defaults are those of `seq_bn`; presets override them."""

    architecture = "bottleneck"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool | None = True
    shared_W_phm: bool | None = False
    shared_phm_rule: bool | None = True
    factorized_phm_rule: bool | None = False
    phm_c_init: str | None = "normal"
    phm_init_range: float | None = 0.0001
    learn_phm: bool | None = True
    hypercomplex_nonlinearity: str | None = "glorot-uniform"
    phm_rank: int | None = 1
    phm_bias: bool | None = True
    stochastic_depth: float | None = 0.0  # DropPath in training only: the identity in the exported (eval) forward

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str) -> MethodConfig:
        legacy = values.get("invertible_adapter")
        if "invertible_adapter" in values:
            # adapters v1 configs nest the invertible block; the reference maps it the same way.
            values = {k: v for k, v in values.items() if k != "invertible_adapter"}
            if legacy:
                if not isinstance(legacy, dict) or not {"block_type", "reduction_factor"} <= set(legacy):
                    raise UserError(f"{path}.invertible_adapter: expected {{\"block_type\": ..., "
                                    f"\"reduction_factor\": ...}}, got {legacy!r}.")
                values.update(inv_adapter=legacy["block_type"], inv_adapter_reduction_factor=legacy["reduction_factor"])
        return super().from_dict(values, path)

    def validate(self, path: str) -> None:
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                    "ln_after", "adapter_residual_before_ln", "is_parallel", "use_gating", "phm_layer"):
            require_type(self, path, key, (bool,))
        if self.residual_before_ln not in (True, False, "post_add"):
            raise self.fail(path, "residual_before_ln", f"expected true, false or \"post_add\", got "
                            f"{self.residual_before_ln!r}.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before and not self.is_parallel:
            raise self.fail(path, "residual_before_ln", "\"post_add\" takes the residual after the model's own "
                            "residual add, which needs original_ln_before true.")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [
            self.reduction_factor]
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
                raise self.fail(path, "reduction_factor", f"must be a number > 0, got {factor!r}.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, int | float | str) or (
                isinstance(self.scaling, str) and self.scaling not in ("learned", "channel")):
            raise self.fail(path, "scaling", f"expected a number, \"learned\" or \"channel\", got {self.scaling!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= (self.stochastic_depth or 0.0) < 1.0:
            raise self.fail(path, "stochastic_depth", f"must be in [0, 1), got {self.stochastic_depth!r}.")
        if self.init_weights not in INITS:
            raise self.fail(path, "init_weights", f"expected one of {list(INITS)}, got {self.init_weights!r}.")
        make_activation(self.non_linearity, f"{path}.non_linearity")
        if self.phm_layer:
            phm.validate(self, path)
        invertible.validate(self, path)
        if self.cross_adapter:
            raise self.fail(path, "cross_adapter", "cross-attention adapters are not supported by fxadapt yet; set "
                            "cross_adapter to false.")

    def reduction_for(self, layer: int, path: str) -> float:
        if not isinstance(self.reduction_factor, dict):
            return self.reduction_factor
        if str(layer) in self.reduction_factor:
            return self.reduction_factor[str(layer)]
        if "default" in self.reduction_factor:
            return self.reduction_factor["default"]
        raise self.fail(path, "reduction_factor", f"the mapping has no entry for layer {layer} and no "
                        "\"default\"; add e.g. {\"default\": 16}.")


_DOUBLE = dict(original_ln_before=False, mh_adapter=True, non_linearity="swish")
_PARALLEL = dict(original_ln_before=False, reduction_factor=2, init_weights="mam_adapter", is_parallel=True,
                 scaling=4.0)
_INV = dict(inv_adapter="nice", inv_adapter_reduction_factor=2)
_PHM = dict(phm_layer=True, reduction_factor=32, non_linearity="gelu")
# AdapterHub's ADAPTER_CONFIG_MAP (adapterplus is its AdapterPlusConfig class, which has no map entry).
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {},
    "double_seq_bn": _DOUBLE,
    "par_bn": _PARALLEL,
    "scaled_par_bn": {**_PARALLEL, "scaling": "learned"},
    "seq_bn_inv": _INV,
    "double_seq_bn_inv": {**_DOUBLE, **_INV},
    "compacter++": _PHM,
    "compacter": {**_DOUBLE, **_PHM},
    "adapterplus": dict(original_ln_after=False, original_ln_before=True, residual_before_ln=False,
                        stochastic_depth=0.1, init_weights="houlsby", scaling="channel", reduction_factor=96,
                        non_linearity="gelu"),
}
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn",
           "pfeiffer+inv": "seq_bn_inv", "houlsby+inv": "double_seq_bn_inv"}
