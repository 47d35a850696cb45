"""DoRA (Liu et al., 2024) as `adapters` 1.3.0 computes it (LoRAConfig `use_dora`, the `dora` preset):

    h' = m / ||W + B A||_row ⊙ (W x + b + s · B A x)          s = alpha / r (or the gate g)

with the magnitude m (`m.weight`, [out, 1], initialised to ||W||_row) and the row norm taken over the
*unscaled* B A, as the reference's forward does. The paper and PEFT normalise W + s·B A and leave the
bias out (PEFT's variant lives in peft.py); a checkpoint is reproduced only with the formula it
was trained under, so fxadapt keeps each library's.

Merging folds the same expression: W' = f ⊙ (W + s·B A), b' = f ⊙ b, f = m / ||W + B A||_row, so
the merged graph equals the unmerged one. (The reference's own merge_adapter drops s and leaves b,
so its merged model differs from its unmerged one whenever alpha != r; docs/reference-deviations.md.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ...errors import UserError
from ...sites import LinearSite
from .module import LoRA


def attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor behind a get_attr target (parameter or buffer)."""
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def site_weight(gm: fx.GraphModule, site: LinearSite) -> torch.Tensor:
    """The site's weight as [out, in], whatever the graph's layout."""
    weight = attribute(gm, site.weight).detach()
    return weight.t() if site.layout == "addmm" else weight


def oriented(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return weight.t() if transposed else weight


def row_norm(matrix: torch.Tensor) -> torch.Tensor:
    """||M||_row: the L2 norm of each output row of an [out, in] matrix (the paper's column norm of W^T)."""
    return torch.linalg.norm(matrix, dim=1)


def refuse_fused(site: LinearSite, chunks: tuple[bool, ...], path: str) -> None:
    if chunks:
        raise UserError(f"{path}.use_dora: DoRA on a fused q/k/v projection ({site.module}) is not supported: its "
                        "magnitude is per output row of the whole projection (adapters 1.3.0 fails on it too). "
                        "Use plain LoRA for this model, or DoRA through a PEFT checkpoint.")


class DoRA(LoRA):
    """LoRA plus the magnitude `m` (an nn.Linear(1, out) as in the reference, so the key is `m.weight`)."""

    composition = "replace"

    def __init__(self, gm: fx.GraphModule, site: LinearSite, config: Any, chunks: tuple[bool, ...],
                 path: str) -> None:
        refuse_fused(site, chunks, path)
        super().__init__(site.in_features, site.out_features, config)
        self.transposed = site.layout == "addmm"
        self.m = nn.Linear(1, site.out_features, bias=False)
        with torch.no_grad():
            self.m.weight.copy_(row_norm(site_weight(gm, site)).unsqueeze(1))

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return self.combine(y, self.delta(x), weight, bias)

    def combine(self, y, update, weight, bias, shared=()):
        """m / ||W + B A||_row ⊙ (y + update): the reference's compute_dora_deltaw, also under a composition."""
        factor = self.m.weight.view(-1) / row_norm(oriented(weight, self.transposed) + self.product())
        return factor * (y + update)

    def fold(self, weight, bias, shared):
        factor = self.m.weight.view(-1) / row_norm(weight + self.product())
        merged = factor[:, None] * (weight + self.delta_weight())
        return merged.to(weight.dtype), (factor * bias).to(bias.dtype) if bias is not None else None
