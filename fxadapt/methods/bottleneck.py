"""Sequential bottleneck adapters (`seq_bn`/pfeiffer, `double_seq_bn`/houlsby), as in `adapters` 1.3.0.

At a residual site with sub-layer output h, residual stream x and the model's norm LN (identity on
pre-LN models), with A(t) = up(act(down(t))) * scaling:

    seq_bn (post-LN):  LN(h + A(LN(h + x)) + x)      # original_ln_before, residual_before_ln
    double_seq_bn:     LN(h + A(h) + x)              # placed after attention and after the FFN

In general (the reference's Adapter.pre_forward / forward / post_forward):
    residual = h                      if residual_before_ln is True
    t = LN(h + x) | h + x | h         by original_ln_before and whether the site has a norm
    residual = (h + x) | t            if residual_before_ln == "post_add" | False
    out = A(t) [+ residual, ln_after order per adapter_residual_before_ln]
    y = LN(out + x) | out + x | out   by original_ln_after
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..errors import UserError
from ..graph_edit import Emitter, add_module
from ..graph_ops import aten
from ..sites import ResidualSite, SiteMap
from .base import MethodConfig, Placement, freeze, require_type

NAME = "bottleneck"


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
    stochastic_depth: float | None = 0.0  # training-time only (DropPath): no effect on the exported forward

    def validate(self, path: str) -> None:
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                    "ln_after", "adapter_residual_before_ln"):
            require_type(self, path, key, (bool,))
        if self.residual_before_ln not in (True, False, "post_add"):
            raise self.fail(path, "residual_before_ln", f"expected true, false or \"post_add\", got "
                            f"{self.residual_before_ln!r}.")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [
            self.reduction_factor]
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, int | float) or factor <= 0:
                raise self.fail(path, "reduction_factor", f"must be a number > 0, got {factor!r}.")
        if isinstance(self.scaling, str) and self.scaling not in ("learned", "channel"):
            raise self.fail(path, "scaling", f"expected a number, \"learned\" or \"channel\", got {self.scaling!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        make_activation(self.non_linearity, f"{path}.non_linearity")
        planned = {"is_parallel": "par_bn", "use_gating": "gated adapters", "phm_layer": "compacter",
                   "inv_adapter": "invertible adapters", "cross_adapter": "cross-attention adapters"}
        for key, what in planned.items():
            if getattr(self, key):
                raise self.fail(path, key, f"{what} are not supported by fxadapt yet; set {key} to its "
                                "default or use seq_bn/double_seq_bn.")

    def reduction_for(self, layer: int, path: str) -> float:
        if not isinstance(self.reduction_factor, dict):
            return self.reduction_factor
        if str(layer) in self.reduction_factor:
            return self.reduction_factor[str(layer)]
        if "default" in self.reduction_factor:
            return self.reduction_factor["default"]
        raise self.fail(path, "reduction_factor", f"the mapping has no entry for layer {layer} and no "
                        "\"default\"; add e.g. {\"default\": 16}.")


PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {},
    "double_seq_bn": dict(original_ln_before=False, mh_adapter=True, non_linearity="swish"),
}
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn"}


def make_activation(name: str, path: str) -> nn.Module:
    """The reference's Activation_Function_Class: transformers' ACT2FN by lower-case name."""
    from transformers.activations import ACT2FN

    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key not in ACT2FN:
        raise UserError(f"{path}: unknown non_linearity {name!r}; choose one of: "
                        f"{', '.join(sorted(ACT2FN))}, leakyrelu.")
    return ACT2FN[key]


class Bottleneck(nn.Module):
    """The bottleneck block; attribute names mirror the reference `Adapter` so checkpoint keys map 1:1."""

    def __init__(self, hidden: int, down: int, config: Config) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.append(self.adapter_norm_before)
        layers += [nn.Linear(hidden, down), make_activation(config.non_linearity, "non_linearity")]
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(down, hidden)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.residual_first = config.adapter_residual_before_ln
        _init(self, config.init_weights)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.adapter_up(self.adapter_down(x)) * self.scaling)
        if self.residual_first:
            out = out + residual
        if hasattr(self, "adapter_norm_after"):
            out = self.adapter_norm_after(out)
        if not self.residual_first:
            out = out + residual
        return out


def _init(module: Bottleneck, scheme: str) -> None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            if scheme == "houlsby":
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            elif scheme == "mam_adapter" and linear is not module.adapter_up:
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            elif scheme == "mam_adapter":
                nn.init.zeros_(linear.weight)
            else:
                linear.weight.normal_(0.0, 0.02)
            nn.init.zeros_(linear.bias)


def reference_module(site: ResidualSite) -> str:
    """The reference's module for this site: the sub-layer's output module when the residual add
    happens inside it (BERT's SelfOutput/Output), else the layer's `attention_adapters`/`output_adapters`."""
    parent = site.projection_module.rpartition(".")[0]
    if site.module == parent:
        return f"{site.module}.adapters"
    slot = "output_adapters" if site.role == "residual.ffn" else "attention_adapters"
    return f"{site.module}.{slot}.adapters"


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    roles = (["residual.attn"] if config.mh_adapter else []) + (["residual.ffn"] if config.output_adapter else [])
    for site in sites.residuals:
        if site.role not in roles or site.layer in config.leave_out:
            continue
        down = int(site.hidden_size // config.reduction_for(site.layer, path))
        if down < 1:
            raise UserError(f"{path}.reduction_factor: {config.reduction_for(site.layer, path)} leaves no "
                            f"bottleneck for hidden size {site.hidden_size}; use a factor <= {site.hidden_size}.")
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", freeze(
            Bottleneck(site.hidden_size, down, config)))
        yield Placement(adapter, NAME, site.role, site.layer, module_path, reference_module(site),
                        _rewrite(gm, site, module_path, config, adapter))


def _rewrite(gm: fx.GraphModule, site: ResidualSite, module_path: str, config: Config, adapter: str) -> int:
    h, x, norm = site.hidden, site.residual, site.norm
    out = site.output
    emit = Emitter(gm, out, {"adapter": adapter, "method": NAME, "pass": "insert_adapters",
                             "site": site.role, "layer": site.layer})
    residual = h if config.residual_before_ln is True else None
    if config.original_ln_before:
        # The model already computes h + x (and LN of it) at this site: reuse those nodes.
        if config.residual_before_ln == "post_add":
            residual = site.add
        t = out
    else:
        t = h
    if config.residual_before_ln is False:
        residual = t
    adapted = emit.call_module(module_path, (t, residual))
    if config.original_ln_after:
        summed = emit.call_function(aten.add.Tensor, (adapted, x))
        final = emit.copy(norm, {site.add: summed}) if norm is not None else summed
    else:
        final = adapted
    emit.reroute(out, final)
    return len(emit.created)
