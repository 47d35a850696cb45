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

Where every fused adapter's down-projection is a plain linear layer followed by parameter-free layers (its
activation), the N down-projections become one [Σr, H] product of t (`down_weight`), and when the fusion's query
is t itself (the default: query after the LayerNorm) the score rows join it: one [2Σr + N, H] product per token
instead of N + 1 — the same multiply-adds, read from t once.
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


def merged_down(adapters: list[Bottleneck]) -> tuple[torch.Tensor, torch.Tensor, list[nn.Module]] | None:
    """The fused adapters' down-projections as one linear layer ([Σr, H] weight, [Σr] bias) and each adapter's
    parameter-free tail (its activation), or None where one of them is not a linear layer followed by such layers
    (a LayerNorm before it, a PHM layer)."""
    weights, biases, tails = [], [], []
    for adapter in adapters:
        first, *rest = adapter.adapter_down
        if type(first) is not nn.Linear or any(any(True for _ in m.parameters()) for m in rest):
            return None
        weights.append(first.weight.detach())
        biases.append(first.bias.detach() if first.bias is not None else first.weight.new_zeros(first.out_features))
        tails.append(copy.deepcopy(nn.Sequential(*rest)))  # its own copy: a module has one parent
    return torch.cat(weights), torch.cat(biases), tails


class FoldedFusion(nn.Module):
    """`forward(query, t, residual, downs)`: downs are the fused adapters' activations h_i of their input t, in
    `adapters` order; None when the module has the merged down-projection (`down_weight`) and computes them."""

    def __init__(self, adapters: list[str], ranks: list[int], tensors: dict[str, torch.Tensor],
                 config: dict[str, Any], tails: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.adapters = list(adapters)
        self.ranks = list(ranks)
        self.config = dict(config)  # the unfolded fusion's, for inspection
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        # One tail for all when the activations are alike (one elementwise op over [.., Σr] instead of N).
        alike = tails is not None and all(type(t) is type(tails[0]) and repr(t) == repr(tails[0]) for t in tails)
        self.down_tails = None if tails is None else nn.ModuleList(tails[:1] if alike else tails)
        if tails is not None:  # [down; score] rows of one product, used when the query is t itself
            self.register_buffer("in_weight", torch.cat([tensors["down_weight"], tensors["score_weight"]]))
            self.register_buffer("in_bias", torch.cat([tensors["down_bias"], tensors["score_bias"]]))
        # Per-adapter sums over the rank units (scores) and broadcasts back to them (weights) through a 0/1
        # [Σr, N] segment matrix: one small MatMul each instead of reshape / reduce / unsqueeze chains.
        segments = torch.zeros(sum(ranks), len(ranks), dtype=tensors["score_weight"].dtype)
        start = 0
        for i, rank in enumerate(ranks):
            segments[start:start + rank, i] = 1.0
            start += rank
        self.register_buffer("segments", segments)
        self.register_buffer("segments_t", segments.T.contiguous())

    @property
    def merges_down(self) -> bool:
        return self.down_tails is not None

    def forward(self, query: torch.Tensor, t: torch.Tensor, residual: torch.Tensor,
                downs: list[torch.Tensor] | None = None) -> torch.Tensor:
        n, total = len(self.ranks), sum(self.ranks)
        if downs is not None:
            h = torch.cat(downs, dim=-1) if len(downs) > 1 else downs[0]
            z_h, z_c = F.linear(query, self.score_weight, self.score_bias).split([total, n], dim=-1)
        elif query is t:  # one product of t for the down-projections and the scores
            pre, z_h, z_c = F.linear(t, self.in_weight, self.in_bias).split([total, total, n], dim=-1)
            h = self._activate(pre)
        else:
            h = self._activate(F.linear(t, self.down_weight, self.down_bias))
            z_h, z_c = F.linear(query, self.score_weight, self.score_bias).split([total, n], dim=-1)
        probs = torch.softmax(torch.matmul(h * z_h, self.segments) + z_c, dim=-1)
        weighted = h * torch.matmul(probs, self.segments_t)  # [a_1 h_1, ..., a_N h_N]
        out = F.linear(torch.cat([weighted, probs], dim=-1), self.value_weight)
        # Without residual_before r is added after the fusion; with it Σ a_i (U_i + r) = Σ a_i U_i + r.
        if hasattr(self, "residual_weight"):
            return out + F.linear(residual, self.residual_weight)
        return out + residual

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        assert self.down_tails is not None
        if len(self.down_tails) == 1:
            return self.down_tails[0](pre)
        parts = pre.split(self.ranks, dim=-1)
        return torch.cat([tail(part) for tail, part in zip(self.down_tails, parts, strict=True)], dim=-1)


def fold(fusion: Fusion, adapters: list[str], ups: list[Affine], dtype: torch.dtype,
         modules: list[Bottleneck] | None = None) -> FoldedFusion:
    """The folded module of `fusion` over `adapters` with up-projections `ups` (module docstring); with the
    adapters' `modules`, their down-projections merge into one where they can (`merged_down`)."""
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
        merged = merged_down(modules) if modules is not None else None
        if merged is not None:
            tensors["down_weight"], tensors["down_bias"] = merged[0], merged[1]
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    return FoldedFusion(adapters, [a.shape[1] for a, _ in ups], tensors, config,
                        merged[2] if merged is not None else None)


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), torch.get_default_dtype())
