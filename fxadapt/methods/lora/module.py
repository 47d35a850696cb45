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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import UserError
from ..graph_edit import add_module
from ..sites import LinearSite, SiteMap
from .base import MethodConfig, Placement, SiteModule, freeze, require_type
from .lora_family import FamilyModule, apply_at, gate_mean, shared_attrs

NAME = "lora"
INIT_WEIGHTS = ("lora", "bert", "ia3", "vera")
# The reference's LoRALinear.supported_compositions (its fused LoRAMergedLinear composes in no block).
BLOCKS: tuple[str, ...] = ("stack", "batch_split", "average", "parallel", "multi_task")


@dataclass
class Config(MethodConfig):
    """AdapterHub's LoRAConfig (also IA3Config, VeraConfig, DoRAConfig: same class, other defaults)."""

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
        for key in ("selfattn_lora", "intermediate_lora", "output_lora", "use_gating", "use_dora"):
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
        if self.init_weights not in INIT_WEIGHTS:
            raise self.fail(path, "init_weights", f"expected one of {list(INIT_WEIGHTS)}, got {self.init_weights!r}.")
        if self.composition_mode not in ("add", "scale"):
            raise self.fail(path, "composition_mode", f"expected \"add\" (LoRA) or \"scale\" ((IA)^3), got "
                            f"{self.composition_mode!r}.")
        for key in ("vera_d", "vera_b"):
            value = getattr(self, key)
            # The reference takes VeRA only for float values (an int silently gives plain LoRA); be explicit.
            if value is not None and (isinstance(value, bool) or not isinstance(value, float)):
                raise self.fail(path, key, f"must be a float such as 0.1 (or null), got {value!r}.")
        if (self.vera_d is None) != (self.vera_b is None):
            raise self.fail(path, "vera_b" if self.vera_b is None else "vera_d", "VeRA needs both vera_d and vera_b "
                            "(the reference's defaults are 0.1 and 0.0); set both or neither.")
        if self.composition_mode == "scale":
            # The reference's IA3 module asserts these; say which field to change instead.
            if self.r != 1:
                raise self.fail(path, "r", f"composition_mode \"scale\" ((IA)^3) scales by a vector, so r must be 1, "
                                f"got {self.r}.")
            if self.dropout > 0:
                raise self.fail(path, "dropout", "composition_mode \"scale\" ((IA)^3) does not support dropout; "
                                "set it to 0.")
            if self.use_dora:
                raise self.fail(path, "use_dora", "DoRA needs composition_mode \"add\".")
            if self.vera_d is not None:
                raise self.fail(path, "vera_d", "VeRA needs composition_mode \"add\"; remove vera_d/vera_b.")
            if self.init_weights == "vera":
                raise self.fail(path, "init_weights", "(IA)^3 initialises with \"ia3\", \"bert\" or \"lora\".")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def variant(self) -> str:
        """Which family member this config builds (the reference's choice in LoRALayer.add_adapter)."""
        if self.composition_mode == "scale":
            return "ia3"
        if self.vera_d is not None:
            return "dvora" if self.use_dora else "vera"
        return "dora" if self.use_dora else "lora"


_IA3 = dict(selfattn_lora=True, intermediate_lora=True, output_lora=False, r=1, alpha=1, attn_matrices=["k", "v"],
            composition_mode="scale", init_weights="ia3")
_VERA = dict(r=8, vera_d=0.1, vera_b=0.0, init_weights="vera")
PRESETS: dict[str, dict[str, Any]] = {"lora": {}, "ia3": _IA3, "vera": _VERA, "dora": dict(use_dora=True),
                                      "dvora": dict(_VERA, use_dora=True)}
ALIASES: dict[str, str] = {}


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


def build(gm: fx.GraphModule, site: LinearSite, config: Config, chunks: tuple[bool, ...], path: str) -> FamilyModule:
    """The module of this config's variant for one site."""
    from . import dora, ia3, vera  # the variants subclass LoRA, so they import this module

    variant = config.variant
    if variant == "ia3":
        return ia3.IA3(site.in_features, site.out_features, config, chunks)
    if variant in ("vera", "dvora"):
        return vera.build(gm, site, config, chunks, path)
    if variant == "dora":
        return dora.DoRA(gm, site, config, chunks, path)
    return LoRA(site.in_features, site.out_features, config, chunks)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """This config's module per adapted projection, for a composed site (the graph is left as is); VeRA adds its
    shared A and B as a "shared" SiteModule, which the composed sites read."""
    from . import vera

    chosen = targets(sites, config)
    for site, chunks in chosen:
        if chunks:
            raise UserError(f"{path}: a fused q/k/v projection ({site.module}) cannot hold a composed LoRA (the "
                            "reference's LoRAMergedLinear does not compose). Activate it alone.")
    found = [SiteModule("linear", sites.linears.index(site), build(gm, site, config, chunks, path),
                        f"{site.module}.loras") for site, chunks in chosen]
    if config.variant in ("vera", "dvora") and chosen:
        found.append(SiteModule("shared", 0, vera.make_shared(config, [site for site, _ in chosen], path),
                                vera.SHARED))
    return found


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    from . import vera

    variant = config.variant
    chosen = targets(sites, config)
    attrs: tuple[fx.Node, ...] = ()
    if variant in ("vera", "dvora") and chosen:
        # One frozen A and B for all layers, registered once, read through get_attr by every VeRA module.
        placement = vera.add_shared(gm, adapter, variant, config, [site for site, _ in chosen], path)
        origin = {"adapter": adapter, "method": variant, "pass": "insert_adapters", "site": "shared", "layer": -1}
        attrs = shared_attrs(gm, vera.shared_targets(placement.module_path), origin)
        placement.nodes_inserted = len(attrs)
        yield placement
    for site, chunks in chosen:
        module = freeze(build(gm, site, config, chunks, path))
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        origin = {"adapter": adapter, "method": variant, "pass": "insert_adapters", "site": site.role,
                  "layer": site.layer}
        count = apply_at(gm, site, module, module_path, origin, attrs)
        yield Placement(adapter, variant, site.role, site.layer, module_path, f"{site.module}.loras", count)
