"""ReFT interventions (Wu et al., 2024) as in `adapters` 1.3.0: LoReFT, NoReFT, DiReFT.

At the output h of each selected layer, on the first `prefix_positions` and last `suffix_positions`
real tokens of each row (from the attention mask: first = argmax(mask), last = first + sum(mask)):

    LoReFT:  h' = h + Rᵀ(act(W h + b) − R h),  R with orthonormal rows (`orthogonality`)
    NoReFT:  the same with an unconstrained R
    DiReFT:  h' = h + Rᵀ act(W h + b)            (`subtract_projection=False`)

R is r x H (`projection`), W/b (`learned_source`). Prefix and suffix positions have their own unit
unless `tied_weights`; where they overlap the suffix unit wins, as the reference scatters it last.
Positions are selected with masks rather than gather/scatter, so any batch and length exports.
LoReFT's R is torch's orthogonal parametrization (Householder map with a stored `base`), written out
in plain ops so that ONNX and TorchScript can run it; see docs/reference-deviations.md for its quirks.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import aten
from ...sites import SiteMap
from ..activation import make_activation
from ..base import MethodConfig, Placement, SiteModule, freeze, require_type

NAME = "reft"
# The reference's ReftLayer is no composable layer: under any setup it runs the setup's first adapter only.
# fxadapt composes ReFT in Stack (site.py), the block the reference documents for it.
BLOCKS: tuple[str, ...] = ("stack",)


@dataclass
class Config(MethodConfig):
    """AdapterHub's ReftConfig. `subtract_projection` is a class constant there, so adapters 1.3.0 never saves
    it: a saved DiReFT loads as NoReFT unless the field is added to its adapter_config.json."""

    architecture = "reft"
    layers: str | list[int] = "all"
    prefix_positions: int = 3
    suffix_positions: int = 0
    r: int = 1
    orthogonality: bool = True
    tied_weights: bool = False
    subtract_projection: bool = True
    dropout: float = 0.05
    non_linearity: str | None = None
    dtype: str | None = None
    output_reft: bool = True
    init_weights_seed: int | None = None

    def validate(self, path: str) -> None:
        for key in ("orthogonality", "tied_weights", "subtract_projection", "output_reft"):
            require_type(self, path, key, (bool,))
        for key in ("prefix_positions", "suffix_positions", "r"):
            require_type(self, path, key, (int,))
            if getattr(self, key) < 0:
                raise self.fail(path, key, f"must be >= 0, got {getattr(self, key)}.")
        if self.r < 1:
            raise self.fail(path, "r", f"the rank must be a positive integer, got {self.r}.")
        if self.prefix_positions == 0 and self.suffix_positions == 0:
            raise self.fail(path, "prefix_positions", "and suffix_positions are both 0: the intervention would "
                            "touch no position; set at least one of them > 0.")
        if self.layers != "all" and not (isinstance(self.layers, list) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers)):
            raise self.fail(path, "layers", f"expected \"all\" or a list of layer indices, got {self.layers!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        if self.non_linearity is not None:
            make_activation(self.non_linearity, f"{path}.non_linearity")
        if self.dtype not in (None, "float32"):
            raise self.fail(path, "dtype", f"fxadapt runs ReFT in float32 only, got {self.dtype!r}; remove dtype.")


_BASE = dict(layers="all", prefix_positions=3, suffix_positions=0, r=1, tied_weights=False)
PRESETS = {
    "loreft": {**_BASE, "orthogonality": True},
    "noreft": {**_BASE, "orthogonality": False},
    "direft": {**_BASE, "orthogonality": False, "subtract_projection": False},
}
ALIASES: dict[str, str] = {}


class _Base(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(n, n))
        self.register_buffer("base", q)


class HouseholderWeight(nn.Module):
    """torch.nn.utils.parametrizations.orthogonal for a wide r x n weight (Householder map, trivialization):

        X = originalᵀ (n x r);  Q = H_0 ... H_{r-1} I[:, :r],  H_i = I − τ_i v_i v_iᵀ,  v_i = e_i + tril(X, −1)[:, i]
        τ_i = 2 / (1 + |tril(X, −1)[:, i]|²);  Q ← Q · trunc(diag X);  weight = (base Q)ᵀ
    State names match torch's (`original`, `0.base`), so checkpoints load unchanged."""

    def __init__(self, r: int, n: int) -> None:
        super().__init__()
        self.original = nn.Parameter(-torch.eye(r, n))  # what torch's right_inverse stores
        self.add_module("0", _Base(n))
        self.register_buffer("eye", torch.eye(n, r), persistent=False)
        self.rank = r

    def forward(self) -> torch.Tensor:
        x = self.original.mT
        reflectors = x.tril(-1)
        tau = 2.0 / (1.0 + (reflectors * reflectors).sum(0))
        q = self.eye
        for i in reversed(range(self.rank)):
            v = reflectors[:, i:i + 1] + self.eye[:, i:i + 1]
            q = q - tau[i] * (v @ (v.mT @ q))
        # torch casts the diagonal to int (truncation): |d| < 1 zeroes the column, see reference-deviations.md
        signs = (x * self.eye).sum(0).to(torch.int32)
        q = q * signs
        return (self._modules["0"].base @ q).mT


class OrthogonalProjection(nn.Module):
    def __init__(self, r: int, n: int) -> None:
        super().__init__()
        self.parametrizations = nn.ModuleDict({"weight": HouseholderWeight(r, n)})

    @property
    def weight(self) -> torch.Tensor:
        return self.parametrizations["weight"]()


class ReftUnit(nn.Module):
    """The reference's ReftUnit: x + (act(W x + b) − [R x]) R."""

    def __init__(self, hidden: int, config: Config) -> None:
        super().__init__()
        self.learned_source = nn.Linear(hidden, config.r)
        if config.orthogonality:
            self.projection = OrthogonalProjection(config.r, hidden)
        else:
            self.projection = nn.Linear(hidden, config.r, bias=False)
        self.subtract_projection = config.subtract_projection
        self.non_linearity = make_activation(config.non_linearity, "non_linearity") if config.non_linearity else (
            nn.Identity())
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.projection.weight
        source = self.non_linearity(self.learned_source(x))
        if self.subtract_projection:
            source = source - x @ weight.mT
        return self.dropout(x + source @ weight)


class ReftModule(nn.Module):
    """One layer's intervention: unit 0 at prefix positions, unit 1 (or 0 if tied) at suffix positions."""

    def __init__(self, hidden: int, config: Config) -> None:
        super().__init__()
        self.tied = config.tied_weights
        self.prefix, self.suffix = config.prefix_positions > 0, config.suffix_positions > 0
        self.units = nn.ModuleList([ReftUnit(hidden, config) for _ in range(1 if self.tied else 2)])

    def forward(self, hidden: torch.Tensor, is_prefix: torch.Tensor, is_suffix: torch.Tensor) -> torch.Tensor:
        if self.tied:
            return torch.where((is_prefix | is_suffix).unsqueeze(-1), self.units[0](hidden), hidden)
        out = hidden
        if self.prefix:
            out = torch.where(is_prefix.unsqueeze(-1), self.units[0](hidden), out)
        if self.suffix:
            out = torch.where(is_suffix.unsqueeze(-1), self.units[1](hidden), out)
        return out


def _layers(sites: SiteMap, config: Config, path: str) -> list:
    """The FFN residual sites (layer outputs) of the selected layers."""
    outputs = {s.layer: s for s in sites.residuals if s.role == "residual.ffn"}
    if not config.output_reft:
        raise UserError(f"{path}.output_reft: ReFT has no other location in adapters 1.3.0; set it to true.")
    layers = sorted(outputs) if config.layers == "all" else list(config.layers)
    missing = [i for i in layers if i not in outputs]
    if missing or not layers:
        raise UserError(f"{path}.layers: this model has layer outputs {sorted(outputs)}, not {missing or layers}; "
                        "use \"all\" or indices from that list.")
    hidden = outputs[layers[0]].hidden_size
    if config.orthogonality and config.r >= hidden:
        raise UserError(f"{path}.r: an orthogonal projection needs r < hidden size ({hidden}), got {config.r}.")
    return [outputs[layer] for layer in layers]


def wire(gm: fx.GraphModule, site, module_path: str, config: Config, adapter: str, pass_name: str = "insert_adapters",
         positions: tuple[fx.Node, fx.Node] | None = None) -> tuple[int, tuple[fx.Node, fx.Node]]:
    """h' = intervention(h) at the layer output; returns (nodes inserted, the position masks, reusable)."""
    target = site.output
    em = Emitter(gm, target, {"adapter": adapter, "method": NAME, "pass": pass_name, "site": "layer.output",
                              "layer": site.layer})
    if positions is None:
        positions = _positions(gm, em, target, config)
    em.reroute(target, em.call_module(module_path, (target, *positions)))
    return len(em.created), positions


def reference_module(sites: SiteMap, layer: int) -> str:
    return f"{sites.layer_prefixes[layer]}.reft_layer.refts"


def composition_refusal(config: Config) -> str | None:
    return None


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """One intervention per selected layer (index: the layer); site.py wires the setup's first."""
    return [SiteModule("reft", site.layer, freeze(ReftModule(site.hidden_size, config)),
                       reference_module(sites, site.layer)) for site in _layers(sites, config, path)]


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    positions = None
    for site in _layers(sites, config, path):
        module_path = add_module(gm, adapter, f"L{site.layer}_reft", freeze(ReftModule(site.hidden_size, config)))
        count, positions = wire(gm, site, module_path, config, adapter, positions=positions)
        yield Placement(adapter, NAME, "layer.output", site.layer, module_path, reference_module(sites, site.layer),
                        count)


def _positions(gm: fx.GraphModule, em: Emitter, hidden: fx.Node, config: Config) -> tuple[fx.Node, fx.Node]:
    """(is_prefix, is_suffix) bool (B, S): the reference's offsets/seqlens from the attention mask."""
    def call(target, *args, **kwargs) -> fx.Node:
        return em.call_function(target, args, kwargs, keep_val=False)

    mask = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "attention_mask"), None)
    if mask is not None:
        ones = call(aten.ones_like.default, mask, dtype=torch.int64)
        first = call(aten.unsqueeze.default, call(aten.argmax.default, mask, 1), 1)  # first real token
        real = call(aten.sum.dim_IntList, call(aten.eq.Scalar, mask, 1), [-1])
        last = call(aten.add.Tensor, first, call(aten.unsqueeze.default, real, 1))  # one past the last real token
        first_end = call(aten.add.Scalar, first, config.prefix_positions)
        last_start = call(aten.sub.Scalar, last, config.suffix_positions)
        ge, lt = aten.ge.Tensor, aten.lt.Tensor
    else:  # no mask: every token is real
        ones = call(aten.ones_like.default, call(aten.select.int, hidden, -1, 0), dtype=torch.int64)
        first, first_end = 0, config.prefix_positions
        last = call(aten.sym_size.int, hidden, 1)
        last_start = call(operator.sub, last, config.suffix_positions)
        ge, lt = aten.ge.Scalar, aten.lt.Scalar
    index = call(aten.sub.Tensor, call(aten.cumsum.default, ones, 1), 1)  # t = 0 .. S-1 per row
    is_prefix = call(aten.logical_and.default, call(ge, index, first), call(lt, index, first_end))
    is_suffix = call(aten.logical_and.default, call(ge, index, last_start), call(lt, index, last))
    return is_prefix, is_suffix
