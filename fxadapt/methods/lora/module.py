"""LoRA (Hu et al., 2021) and its family as in `adapters` 1.3.0's LoRAConfig, by config:

    LoRA        h' = W x + b + (alpha / r) · B(A(dropout(x)))
    gated LoRA  h' = W x + b + g · B(A(x)),  g = mean_seq(sigmoid(G x))   (use_gating; no alpha/r)
    (IA)^3      h' = (W x + b) ⊙ (alpha · l)                              (composition_mode "scale", ia3.py)
    VeRA        h' = W x + b + (alpha / r) · Λ_b B Λ_d A x, A and B shared and frozen      (vera.py)
    DoRA        h' = m / ||W + B A||_row ⊙ (W x + b + (alpha / r) · B A x)                (use_dora, dora.py)

Placement (the reference's LoRAConfig): `selfattn_lora` adapts the self-attention projections named in
`attn_matrices` (default q and v); `intermediate_lora` the FFN's first projection and `output_lora`
its last. In a gated FFN (`down(act(gate(x)) * up(x))`, Llama/Mistral) the reference maps
`intermediate_lora` to down_proj and `output_lora` to up_proj; fxadapt follows it so checkpoints
match. A fused q/k/v projection (GPT-2's c_attn) gets one LoRA whose A and B stack the enabled
matrices, zero-padded in the output like the reference's LoRAMergedLinear.

This file holds the plain LoRA module; config.py the config, emit.py where and which variant is inserted.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import Config
from .family import FamilyModule, gate_mean


class LoRA(FamilyModule):
    """delta(x) = (alpha / r) · dropout(x) @ A^T @ B^T (or g · x @ A^T @ B^T when gated); attribute names
    mirror the reference `LoRA`. `F.linear(x, A)` is `x @ A^T`: one GEMM op per factor in the captured graph.

    With `chunks` (a fused q/k/v projection), A stacks the enabled matrices' A's and B their B's; the
    output is padded with zeros for the disabled chunks, and a gate has one head per enabled chunk.
    """

    composition = "add"

    def __init__(self, in_features: int, out_features: int, config: Config,
                 chunks: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.r = config.r
        self.chunks = chunks
        enabled = sum(chunks) if chunks else 1
        self.chunk_size = out_features // len(chunks) if chunks else out_features
        self.lora_A = nn.Parameter(torch.zeros(config.r * enabled, in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.chunk_size * enabled, config.r))
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gated = config.use_gating
        with torch.no_grad():
            if config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif config.init_weights == "ia3":
                nn.init.ones_(self.lora_A)
                nn.init.ones_(self.lora_B)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5) if config.init_weights == "lora" else 0)
                if config.init_weights == "vera":
                    nn.init.kaiming_uniform_(self.lora_B)
        if self.gated:
            self.gate = nn.Linear(in_features, enabled)
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x)

    def delta(self, x: torch.Tensor, gate_input: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled (or gated) update B A x; the gate reads `gate_input` (the layer input) when given."""
        gate = gate_mean(self.gate, x if gate_input is None else gate_input).unsqueeze(1) if self.gated else None
        h = self.lora_dropout(x)
        if not self.chunks:
            out = F.linear(F.linear(h, self.lora_A), self.lora_B)
            return out * gate if gate is not None else out * self.scaling
        after_a = F.linear(h, self.lora_A)
        parts, index = [], 0
        for enabled in self.chunks:
            if enabled:
                a = after_a[..., index * self.r:(index + 1) * self.r]
                b = self.lora_B[index * self.chunk_size:(index + 1) * self.chunk_size]
                part = F.linear(a, b)
                parts.append(part * gate[..., index:index + 1] if gate is not None else part)
                index += 1
            else:
                parts.append(x.new_zeros((*x.shape[:-1], self.chunk_size)))
        out = torch.cat(parts, dim=-1)
        return out if gate is not None else out * self.scaling

    def update(self, hidden, layer_input, shared=()):
        return self.delta(layer_input if hidden is None else hidden, layer_input)

    def product(self) -> torch.Tensor:
        """B A as an [out, in] matrix (zero rows for disabled chunks), unscaled."""
        if not self.chunks:
            return self.lora_B @ self.lora_A
        rows, index = [], 0
        for enabled in self.chunks:
            if enabled:
                a = self.lora_A[index * self.r:(index + 1) * self.r]
                b = self.lora_B[index * self.chunk_size:(index + 1) * self.chunk_size]
                rows.append(b @ a)
                index += 1
            else:
                rows.append(self.lora_A.new_zeros(self.chunk_size, self.lora_A.shape[1]))
        return torch.cat(rows, dim=0)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A as an [out, in] matrix."""
        return self.product() * self.scaling

    def fold(self, weight, bias, shared):
        return weight + self.delta_weight().to(weight.dtype), bias
