"""LoRA (Hu et al., 2021) as in `adapters` 1.3.0: h' = W x + b + (alpha / r) · B(A(dropout(x))).

Placement (the reference's LoRAConfig): `selfattn_lora` adapts the self-attention projections named in
`attn_matrices` (default q and v); `intermediate_lora` the FFN's first projection and `output_lora`
its last. In a gated FFN (`down(act(gate(x)) * up(x))`, Llama/Mistral) the reference maps
`intermediate_lora` to down_proj and `output_lora` to up_proj; fxadapt follows it so checkpoints
match. A fused q/k/v projection (GPT-2's c_attn) gets one LoRA whose A and B stack the enabled
matrices, zero-padded in the output like the reference's LoRAMergedLinear.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..graph_edit import Emitter, add_module
from ..graph_ops import ADDMM, aten, is_call
from ..sites import LinearSite, SiteMap
from .base import MethodConfig, Placement, freeze, require_type

NAME = "lora"


@dataclass
class Config(MethodConfig):
    """AdapterHub's LoRAConfig."""

    architecture = "lora"
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
        for key in ("selfattn_lora", "intermediate_lora", "output_lora"):
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
        if self.composition_mode != "add":
            raise self.fail(path, "composition_mode", "only \"add\" (LoRA) is supported yet; \"scale\" is (IA)^3.")
        for key, what in (("use_gating", "gated LoRA"), ("use_dora", "DoRA")):
            if getattr(self, key):
                raise self.fail(path, key, f"{what} is not supported by fxadapt yet.")
        if self.vera_d is not None or self.vera_b is not None:
            raise self.fail(path, "vera_d", "VeRA is not supported by fxadapt yet.")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


PRESETS = {"lora": {}}
ALIASES: dict[str, str] = {}


class LoRA(nn.Module):
    """delta(x) = (alpha / r) · dropout(x) @ A^T @ B^T; attribute names mirror the reference `LoRA`.
    `F.linear(x, A)` is `x @ A^T`: one GEMM op per factor in the captured graph.

    With `chunks` (a fused q/k/v projection), A stacks the enabled matrices' A's and B their B's; the
    output is padded with zeros for the disabled chunks.
    """

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
        with torch.no_grad():
            if config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lora_dropout(x)
        if not self.chunks:
            return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        after_a = F.linear(x, self.lora_A)
        parts, index = [], 0
        for enabled in self.chunks:
            if enabled:
                a = after_a[..., index * self.r:(index + 1) * self.r]
                b = self.lora_B[index * self.chunk_size:(index + 1) * self.chunk_size]
                parts.append(F.linear(a, b))
                index += 1
            else:
                parts.append(x.new_zeros((*x.shape[:-1], self.chunk_size)))
        return torch.cat(parts, dim=-1) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A as an [out, in] matrix (zero rows for disabled chunks)."""
        if not self.chunks:
            return self.lora_B @ self.lora_A * self.scaling
        rows, index = [], 0
        for enabled in self.chunks:
            if enabled:
                a = self.lora_A[index * self.r:(index + 1) * self.r]
                b = self.lora_B[index * self.chunk_size:(index + 1) * self.chunk_size]
                rows.append(b @ a)
                index += 1
            else:
                rows.append(self.lora_A.new_zeros(self.chunk_size, self.lora_A.shape[1]))
        return torch.cat(rows, dim=0) * self.scaling


def targets(sites: SiteMap, config: Config) -> list[tuple[LinearSite, tuple[bool, ...]]]:
    """The projections this config adapts, with the enabled chunks of fused q/k/v projections."""
    wanted: set[str] = set()
    if config.selfattn_lora:
        wanted |= {f"attn.{m}" for m in config.attn_matrices}
    ffn_in, ffn_out = ("ffn.down", "ffn.up") if sites.gated_ffn else ("ffn.up", "ffn.down")
    if config.intermediate_lora:
        wanted.add(ffn_in)
    if config.output_lora:
        wanted.add(ffn_out)
    chosen = []
    for site in sites.linears:
        if site.layer in config.leave_out:
            continue
        if site.role == "attn.qkv" and config.selfattn_lora:
            chunks = tuple(role in config.attn_matrices for role in site.fused)
            if any(chunks):
                chosen.append((site, chunks))
        elif site.role in wanted:
            chosen.append((site, ()))
    return chosen


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    for site, chunks in targets(sites, config):
        module = freeze(LoRA(site.in_features, site.out_features, config, chunks))
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        count = 0
        for node in site.nodes:
            emitter = Emitter(gm, node, {"adapter": adapter, "method": NAME, "pass": "insert_adapters",
                                         "site": site.role, "layer": site.layer})
            x = node.args[1] if is_call(node, ADDMM) else node.args[0]
            delta = emitter.call_module(module_path, (x,))
            emitter.reroute(node, emitter.call_function(aten.add.Tensor, (node, delta)))
            count += len(emitter.created)
        yield Placement(adapter, NAME, site.role, site.layer, module_path, f"{site.module}.loras", count)
