"""VeRA (Kopiczko et al., 2024) as `adapters` 1.3.0 builds it (LoRAConfig with float `vera_d`/`vera_b`):

    h' = W x + b + s · (Λ_b B Λ_d A) x        s = alpha / r (or the gate g when use_gating)

A [r, in] and B [out, r] are frozen random matrices shared by every adapted projection of the adapter
(`init_shared_vera_parameters`; saved as `shared_parameters.<name>.lora_A/lora_B`); each projection
trains its own `vera_D` [r, r] and `vera_B` [out, out], initialised to vera_d·I and vera_b·I. The
reference stores and trains them as full matrices (not vectors), so fxadapt does too, for checkpoint
parity. Because A and B are shared, every adapted projection must have the shape of the first one
(the reference fails otherwise, e.g. on GQA's narrower k/v projections); fxadapt says so up front.

With use_dora (`dvora`): h' = m / ||W + Λ_b B Λ_d A||_row ⊙ (W x + b + s · Λ_b B Λ_d A x) (dora.py).
Merging: W' = W + s · Λ_b B Λ_d A (and DoRA's fold for dvora).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ...errors import UserError
from ...graph_edit import add_module
from ...sites import LinearSite
from ..base import Placement
from .dora import oriented, refuse_fused, row_norm, site_weight
from .family import FamilyModule, gate_mean

SHARED = "shared_parameters"  # the reference's container of A and B, under the base model


class VeraShared(nn.Module):
    """The frozen A and B shared by all VeRA modules of one adapter."""

    def __init__(self, r: int, in_features: int, out_features: int, init_weights: str) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features), requires_grad=False)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r), requires_grad=False)
        with torch.no_grad():
            if init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif init_weights == "ia3":
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A)
                nn.init.kaiming_uniform_(self.lora_B)


def add_shared(gm: fx.GraphModule, adapter: str, variant: str, config: Any, sites: list[LinearSite],
               path: str) -> Placement:
    """Register the adapter's shared A and B; refuse sites whose shape differs from the first one's."""
    module_path = add_module(gm, adapter, "shared", make_shared(config, sites, path))
    return Placement(adapter, variant, "shared", -1, module_path, SHARED, 0)


def make_shared(config: Any, sites: list[LinearSite], path: str) -> VeraShared:
    """The adapter's shared A and B (not registered anywhere); refuses sites of another shape than the first."""
    first = sites[0]
    for site in sites:
        if site.fused:
            raise UserError(f"{path}: VeRA on a fused q/k/v projection ({site.module}) is not supported (adapters "
                            "1.3.0 fails on it too); use LoRA or (IA)^3 for this model.")
        if (site.in_features, site.out_features) != (first.in_features, first.out_features):
            raise UserError(
                f"{path}: VeRA shares one A and B across all adapted projections, so they must all have one shape, "
                f"but {first.module} is {first.in_features}->{first.out_features} and {site.module} is "
                f"{site.in_features}->{site.out_features}; restrict the placement (attn_matrices, intermediate_lora, "
                "output_lora) to projections of one shape.")
    return VeraShared(config.r, first.in_features, first.out_features, config.init_weights)


def shared_targets(module_path: str) -> tuple[str, str]:
    return f"{module_path}.lora_A", f"{module_path}.lora_B"


class VeRA(FamilyModule):
    """The per-projection scalings; attribute names mirror the reference `Vera` (`vera_D`, `vera_B`, `gate`)."""

    composition = "add"

    def __init__(self, in_features: int, out_features: int, config: Any) -> None:
        super().__init__()
        self.vera_D = nn.Parameter(torch.diag(torch.ones(config.r) * config.vera_d))
        self.vera_B = nn.Parameter(torch.diag(torch.ones(out_features) * config.vera_b))
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gated = config.use_gating
        if self.gated:
            self.gate = nn.Linear(in_features, 1)
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return self.delta(x, lora_A, lora_B)

    def product(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        """Λ_b B Λ_d A as an [out, in] matrix, unscaled (the reference's `delta_w`)."""
        return self.vera_B @ lora_B @ self.vera_D @ lora_A

    def delta(self, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
              gate_input: torch.Tensor | None = None) -> torch.Tensor:
        out = F.linear(self.lora_dropout(x), self.product(lora_A, lora_B))
        if self.gated:
            return out * gate_mean(self.gate, x if gate_input is None else gate_input).unsqueeze(1)
        return out * self.scaling

    def update(self, hidden, layer_input, shared=()):
        return self.delta(layer_input if hidden is None else hidden, *shared, gate_input=layer_input)

    def fold(self, weight, bias, shared):
        return weight + (self.product(*shared) * self.scaling).to(weight.dtype), bias


class VeRADoRA(VeRA):
    """DVoRA: VeRA's update with DoRA's magnitude `m` (see dora.py for the formula)."""

    composition = "replace"

    def __init__(self, gm: fx.GraphModule, site: LinearSite, config: Any) -> None:
        super().__init__(site.in_features, site.out_features, config)
        self.transposed = site.layout == "addmm"
        self.m = nn.Linear(1, site.out_features, bias=False)
        with torch.no_grad():
            self.m.weight.copy_(row_norm(site_weight(gm, site)).unsqueeze(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor) -> torch.Tensor:
        return self.combine(y, self.delta(x, lora_A, lora_B), weight, bias, (lora_A, lora_B))

    def combine(self, y, update, weight, bias, shared=()):
        factor = self.m.weight.view(-1) / row_norm(oriented(weight, self.transposed) + self.product(*shared))
        return factor * (y + update)

    def fold(self, weight, bias, shared):
        product = self.product(*shared)
        factor = self.m.weight.view(-1) / row_norm(weight + product)
        merged = factor[:, None] * (weight + product * self.scaling)
        return merged.to(weight.dtype), (factor * bias).to(bias.dtype) if bias is not None else None


def build(gm: fx.GraphModule, site: LinearSite, config: Any, chunks: tuple[bool, ...], path: str) -> VeRA:
    if config.use_dora:
        refuse_fused(site, chunks, path)
        return VeRADoRA(gm, site, config)
    return VeRA(site.in_features, site.out_features, config)
