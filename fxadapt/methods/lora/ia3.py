"""(IA)^3 (Liu et al., 2022) as `adapters` 1.3.0 builds it: LoRAConfig with composition_mode "scale", r = 1.

    h' = (W x + b) ⊙ (alpha · l)          l = lora_B, one factor per output feature
    h' = (W x + b) ⊙ (g · l)              use_gating: g = mean_seq(sigmoid(G x)), no alpha

Placement is LoRA's (`ia3` preset: k, v and `intermediate_lora`). The reference scales the *output* of
the FFN's first projection (BERT's intermediate.dense, before the activation; Llama's down_proj, by
the reference's gated-FFN mapping), while the paper scales the activation that enters the second
projection; fxadapt follows the code so that checkpoints give the reference's numbers
(docs/reference-deviations.md). On a fused q/k/v projection the disabled chunks keep factor 1.

Merging: W' = diag(alpha · l) W and b' = alpha · l ⊙ b (per output row).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .family import FamilyModule, gate_mean


class IA3(FamilyModule):
    """The scaling vector; attribute names mirror the reference `IA3` (`lora_B` [out, 1], `gate`)."""

    composition = "scale"

    def __init__(self, in_features: int, out_features: int, config: Any, chunks: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.chunks = chunks
        enabled = sum(chunks) if chunks else 1
        self.chunk_size = out_features // len(chunks) if chunks else out_features
        self.lora_B = nn.Parameter(torch.zeros(self.chunk_size * enabled, config.r))
        self.scaling = config.alpha
        self.gated = config.use_gating
        with torch.no_grad():
            if config.init_weights == "bert":
                nn.init.normal_(self.lora_B, std=0.02)
            elif config.init_weights == "ia3":
                nn.init.ones_(self.lora_B)
        if self.gated:
            self.gate = nn.Linear(in_features, enabled)
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The factor to multiply the projection's output by: [out], or [batch, 1, out] when gated."""
        if not self.gated:
            return self.scale_vector()
        gate = gate_mean(self.gate, x).unsqueeze(1)  # [batch, 1, heads]
        vector = self.lora_B.view(-1)
        if not self.chunks:
            return vector * gate
        parts, index = [], 0
        for enabled in self.chunks:
            if enabled:
                chunk = vector[index * self.chunk_size:(index + 1) * self.chunk_size]
                parts.append(chunk * gate[..., index:index + 1])
                index += 1
            else:
                parts.append(gate.new_ones((*gate.shape[:-1], self.chunk_size)))
        return torch.cat(parts, dim=-1)

    def update(self, hidden, layer_input, shared=()):
        """The reference IA3.forward: the factor (alpha · l, or g · l when gated), times `hidden` when a previous
        adapter of a Stack gave one."""
        factor = self.forward(layer_input)
        return factor if hidden is None else hidden * factor

    def scale_vector(self) -> torch.Tensor:
        """alpha · l over all output features (1 for disabled chunks of a fused projection)."""
        vector = self.lora_B.view(-1) * self.scaling
        if not self.chunks:
            return vector
        parts, index = [], 0
        for enabled in self.chunks:
            if enabled:
                parts.append(vector[index * self.chunk_size:(index + 1) * self.chunk_size])
                index += 1
            else:
                parts.append(vector.new_ones(self.chunk_size))
        return torch.cat(parts)

    def fold(self, weight, bias, shared):
        scale = self.scale_vector().to(weight.dtype)
        return weight * scale[:, None], (bias * scale if bias is not None else None)
