"""AdapterFusion folded into the fused adapters' rank-sized up-projections (built by passes/fold_fusion.py).

Each fused adapter i reads the same input t; its up-projection is affine in its bottleneck activation
h_i = act(down_i(t)) (rank r_i): U_i = s_i ⊙ (W_up_i h_i + b_up_i) = A_i h_i + β_i. Fusion (fusion.py, T = 1) is

    score_i = Q'·U_i + (terms equal for every i, which cancel in the softmax: Q·b_k, Q·W_k r)
            = h_i·(A_i^T M q + A_i^T m) + (M^T β_i)·q + β_i·m      Q' = M q + m = W_k^T (W_q q + b_q)
    out     = Σ_i a_i (V A_i h_i + V β_i) + (V r if residual_before else r)     (Σ_i a_i = 1)

with M, m, V = W_k^T W_q, W_k^T b_q, W_v when query/key/value are on (identity / zero when off; without a
key Q' = Q). So all N scores take one [Σr + N, H] product of q, and the value one [H, Σr + N] product of
[a_1 h_1, ..., a_N h_N, a_1, ..., a_N]: rank-sized, no hidden x hidden matmul except W_v r under
residual_before with a value projection (kept: r is the same for every adapter, but W_v r is not r).
value_before_softmax does not matter: W_v Σ a_i x_i = Σ a_i W_v x_i. Products are formed in float64.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import phm
from .fusion import Fusion
from .module import Bottleneck

Affine = tuple[torch.Tensor, torch.Tensor]  # (A [H, r], β [H]) in float64: U = A h + β


def down_activation(adapter: Bottleneck, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """h = act(down(x)) of a bottleneck adapter: the loop of `Bottleneck.run` up to its up-projection."""
    for layer in adapter.adapter_down:
        x = adapter._project(layer, x, shared)
    return x


def affine_up(adapter: Bottleneck, hidden: int, shared: dict[str, torch.Tensor]) -> Affine | str:
    """The adapter's scaled up-projection as (A, β) with U = A h + β, or why it is not affine."""
    layer = adapter.adapter_up
    if not isinstance(layer, nn.Linear | phm.PHMLayer):
        return f"its up-projection is a {type(layer).__name__}, not a linear layer whose weight can be materialized"
    with torch.no_grad():
        rank = down_activation(adapter, torch.zeros(1, hidden, dtype=_dtype(adapter)), shared).shape[-1]
        # Probe the layer on 0 and the identity in float64: exact for nn.Linear, and PHM's Kronecker weight is
        # materialized by its own forward (one implementation of it).
        probe = copy.deepcopy(layer).double()
        wide = {k: v.double() for k, v in shared.items()}
        run = (lambda x: probe(x, wide)) if isinstance(probe, phm.PHMLayer) else probe
        beta = run(torch.zeros(1, rank, dtype=torch.float64))[0]
        weight = (run(torch.eye(rank, dtype=torch.float64)) - beta).T  # [H, r]
        scale = adapter.scaling  # a number, a learned scalar or a learned per-channel vector
        scale = (scale.detach().double() if isinstance(scale, torch.Tensor)
                 else torch.tensor([scale], dtype=torch.float64)).reshape(-1)
        return weight * scale[:, None], beta * scale


class FoldedFusion(nn.Module):
    """`forward(query, downs, residual)`: downs are the fused adapters' activations h_i, in `adapters` order."""

    def __init__(self, adapters: list[str], ranks: list[int], tensors: dict[str, torch.Tensor],
                 config: dict[str, Any]) -> None:
        super().__init__()
        self.adapters = list(adapters)
        self.ranks = list(ranks)
        self.config = dict(config)  # the unfolded fusion's, for inspection
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        if len(set(ranks)) > 1:  # unequal ranks: sum per adapter through a 0/1 [Σr, N] matrix
            segments = torch.zeros(sum(ranks), len(ranks), dtype=tensors["score_weight"].dtype)
            start = 0
            for i, rank in enumerate(ranks):
                segments[start:start + rank, i] = 1.0
                start += rank
            self.register_buffer("segments", segments)
        else:
            self.segments = None

    def forward(self, query: torch.Tensor, downs: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        n, total = len(self.ranks), sum(self.ranks)
        h = torch.cat(downs, dim=-1) if len(downs) > 1 else downs[0]
        z = F.linear(query, self.score_weight, self.score_bias)  # [.., Σr + N]
        if self.segments is None:
            scores = (h * z[..., :total]).unflatten(-1, (n, self.ranks[0])).sum(-1)
        else:
            scores = torch.matmul(h * z[..., :total], self.segments)
        probs = torch.softmax(scores + z[..., total:], dim=-1)
        if self.segments is None:
            weighted = (h.unflatten(-1, (n, self.ranks[0])) * probs.unsqueeze(-1)).flatten(-2)
        else:
            weighted = h * torch.matmul(probs, self.segments.T)
        out = F.linear(torch.cat([weighted, probs], dim=-1), self.value_weight)
        # Without residual_before r is added after the fusion; with it Σ a_i (U_i + r) = Σ a_i U_i + r.
        if hasattr(self, "residual_weight"):
            return out + F.linear(residual, self.residual_weight)
        return out + residual


def fold(fusion: Fusion, adapters: list[str], ups: list[Affine], dtype: torch.dtype) -> FoldedFusion:
    """The folded module of `fusion` over `adapters` with up-projections `ups` (module docstring)."""
    config = fusion.config
    hidden = ups[0][0].shape[0]
    with torch.no_grad():
        def weight(name: str) -> torch.Tensor:
            return getattr(fusion, name).weight.detach().double()

        m_mat = torch.eye(hidden, dtype=torch.float64)
        m_vec = torch.zeros(hidden, dtype=torch.float64)
        if config["query"]:
            m_mat, m_vec = weight("query"), fusion.query.bias.detach().double()
        if config["key"]:
            m_mat, m_vec = weight("key").T @ m_mat, weight("key").T @ m_vec
        value = weight("value") if config["value"] else None
        rows = [(m_mat.T @ a).T for a, _ in ups] + [torch.stack([m_mat.T @ b for _, b in ups])]
        bias = [a.T @ m_vec for a, _ in ups] + [torch.stack([b @ m_vec for _, b in ups])]
        columns = [a for a, _ in ups] + [torch.stack([b for _, b in ups], dim=1)]
        if value is not None:
            columns = [value @ c for c in columns]
        tensors = {"score_weight": torch.cat(rows), "score_bias": torch.cat(bias),
                   "value_weight": torch.cat(columns, dim=1)}
        if config["residual_before"] and value is not None:
            tensors["residual_weight"] = value  # Σ a_i W_v r = W_v r: the one hidden x hidden product left
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return FoldedFusion(adapters, [a.shape[1] for a, _ in ups], tensors, config)


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.get_default_dtype())
