"""Bottleneck adapters as in `adapters` 1.3.0: seq_bn/pfeiffer, double_seq_bn/houlsby, par_bn, scaled_par_bn,
compacter, compacter++, seq_bn_inv, double_seq_bn_inv and AdapterPlus — one BnConfig, several presets.

At a residual site with sub-layer output h, residual stream x and the model's norm LN (identity on
pre-LN models), with the bottleneck A(t) = g(t) · dropout(s · up(act(down(t)))):

    seq_bn (post-LN):  LN(h + A(LN(h + x)) + x)      # original_ln_before, residual_before_ln
    double_seq_bn:     LN(h + A(h) + x)              # after attention and after the FFN
    par_bn:            LN(h + A(x) + x)              # parallel to the sub-layer, s = 4 (learned: scaled_par_bn)
    adapterplus:       LN(h + x) + A(LN(h + x))      # original_ln_after False, residual_before_ln False,
                                                      # s per channel; stochastic depth is identity in eval

s is a number, a learned scalar ("learned") or a learned vector ("channel"); g(t) = 1, or with
`use_gating` g(t) = mean over the sequence of sigmoid(gate(t)) ([batch, 1, 1], padded positions
included, as in the reference). With `phm_layer` (compacter) `down` and `up` are PHM layers
(`phm.py`); with `inv_adapter` an invertible block follows the embeddings (`invertible.py`).

In general (Bottleneck.pre_forward / run / post_forward: the reference's Adapter methods), sequential:
    residual = h                      if residual_before_ln is True
    t = LN(h + x) | h + x | h         by original_ln_before and whether the site has a norm
    residual = (h + x) | t            if residual_before_ln == "post_add" | False
    out = A(t) [+ residual, ln_after order per adapter_residual_before_ln]
    y = LN(out + x) | out + x | out   by original_ln_after
and parallel (ParallelAdapter): out = ln_after(A(x)) + h;  y = LN(out + x) | out + x | out.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..activation import make_activation
from . import phm
from .config import Config


class Bottleneck(nn.Module):
    """The bottleneck block; attribute names mirror the reference `Adapter` so checkpoint keys map 1:1. Its
    methods are the one implementation the single emitter and composed sites (site.py) share.

    `forward(x, residual, *shared)`: `shared` are the adapter's shared PHM tensors, in `shared_names` order."""

    def __init__(self, hidden: int, down: int, config: Config, shared_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.shared_names = shared_names
        layers: list[nn.Module] = []
        if config.ln_before:
            self.adapter_norm_before = nn.LayerNorm(hidden)
            layers.append(self.adapter_norm_before)
        layers.append(phm.PHMLayer(hidden, down, "down", config) if config.phm_layer else nn.Linear(hidden, down))
        layers.append(make_activation(config.non_linearity, "non_linearity"))
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = phm.PHMLayer(down, hidden, "up", config) if config.phm_layer else nn.Linear(down, hidden)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden))
        else:
            self.scaling = float(config.scaling)
        if config.ln_after:
            self.adapter_norm_after = nn.LayerNorm(hidden)
        if config.use_gating:
            self.gate = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(config.dropout)
        self.parallel = config.is_parallel
        self.residual_first = config.adapter_residual_before_ln
        # Only the sequential Adapter has the reference's DropPath (ParallelAdapter ignores stochastic_depth).
        self.stochastic_depth = 0.0 if config.is_parallel else float(config.stochastic_depth or 0.0)
        # Where the adapter reads and writes the residual stream (pre_forward / post_forward).
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.residual_before_ln = config.residual_before_ln
        _init(self, config.init_weights)

    def _project(self, layer: nn.Module, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        return layer(x, shared) if isinstance(layer, phm.PHMLayer) else layer(x)

    def pre_forward(self, h: Any, x: Any, ln: Callable[[Any], Any] | None = None, fusion: dict | None = None,
                    add: Callable[[Any, Any], Any] = operator.add) -> tuple[Any, Any, Any]:
        """The reference's Adapter/ParallelAdapter.pre_forward: (adapter input t, fusion query, adapter residual)
        from the sub-layer output h and the residual stream x. `ln` is the model's norm at the site (None on
        pre-LN models); `add` lets the single-adapter emitter run this on graph nodes."""
        if self.parallel:
            return x, (x if fusion is not None else None), x
        query = h if fusion is not None and fusion["query_before_ln"] else None
        residual, t = (h if self.residual_before_ln is True else None), h
        if self.original_ln_before:
            t = add(h, x)
            if self.residual_before_ln == "post_add":
                residual = t
            if ln is not None:
                t = ln(t)
        if not self.residual_before_ln:
            residual = t
        if fusion is not None and not fusion["query_before_ln"]:
            query = t
        return t, query, residual

    def post_forward(self, hidden: Any, h: Any, x: Any, ln: Callable[[Any], Any] | None = None,
                     add: Callable[[Any, Any], Any] = operator.add) -> Any:
        """The reference's post_forward: the parallel adapter joins h; then LN(hidden + x) if original_ln_after."""
        if self.parallel:
            hidden = add(hidden, h)
        if self.original_ln_after:
            hidden = add(hidden, x)
            if ln is not None:
                hidden = ln(hidden)
        return hidden

    def run(self, x: torch.Tensor, residual: torch.Tensor | None,
            shared: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's Adapter.forward: (output, scaled up-projection, which AdapterFusion reads)."""
        down = x
        for layer in self.adapter_down:
            down = self._project(layer, down, shared)
        up = self._project(self.adapter_up, down, shared)
        if self.training and self.stochastic_depth > 0.0:  # DropPath: the identity in eval (and in exports)
            up = _drop_path(up, self.stochastic_depth)
        up = up * self.scaling
        out = self.dropout(up)
        if hasattr(self, "gate"):
            out = out * torch.mean(torch.sigmoid(self.gate(x)), dim=1).unsqueeze(-1)
        if self.parallel:  # ParallelAdapter.forward: no residual inside the adapter
            return (self.adapter_norm_after(out) if hasattr(self, "adapter_norm_after") else out), up
        if self.residual_first:
            out = out + residual
        if hasattr(self, "adapter_norm_after"):
            out = self.adapter_norm_after(out)
        if not self.residual_first:
            out = out + residual
        return out, up

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, *shared: torch.Tensor) -> torch.Tensor:
        return self.run(x, residual, dict(zip(self.shared_names, shared, strict=True)))[0]


def _drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """torchvision's StochasticDepth(p, mode="row"): drop whole samples in training, rescale the rest."""
    keep = x.new_empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def _init(module: Bottleneck, scheme: str) -> None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    gate = getattr(module, "gate", None)
    with torch.no_grad():
        for linear in linears:
            if linear is gate:
                if scheme != "houlsby":  # the reference leaves the gate at nn.Linear's init under houlsby
                    linear.weight.normal_(0.0, 0.02)
                    nn.init.zeros_(linear.bias)
                continue
            if scheme == "houlsby":
                nn.init.trunc_normal_(linear.weight, std=1e-2, a=-2e-2, b=2e-2)
            elif scheme == "mam_adapter" and linear is not module.adapter_up:
                nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            elif scheme == "mam_adapter":
                nn.init.zeros_(linear.weight)
            else:
                linear.weight.normal_(0.0, 0.02)
            nn.init.zeros_(linear.bias)
