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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .. import meta
from ..errors import UserError
from ..graph_edit import Emitter, add_module
from ..graph_ops import aten
from ..sites import ResidualSite, SiteMap
from . import invertible, phm
from .activation import make_activation
from .base import MethodConfig, Placement, SiteModule, freeze, require_type

NAME = "bottleneck"
# The reference's BottleneckLayer.supported_compositions.
BLOCKS: tuple[str, ...] = ("stack", "fuse", "split", "parallel", "batch_split", "average")
INITS = ("bert", "mam_adapter", "houlsby")


@dataclass
class Config(MethodConfig):
    """AdapterHub's BnConfig. Defaults are those of `seq_bn`; presets override them."""

    architecture = "bottleneck"
    mh_adapter: bool = False
    output_adapter: bool = True
    reduction_factor: float | dict[str, float] = 16
    non_linearity: str = "relu"
    original_ln_before: bool = True
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list[int] = field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool | None = True
    shared_W_phm: bool | None = False
    shared_phm_rule: bool | None = True
    factorized_phm_rule: bool | None = False
    phm_c_init: str | None = "normal"
    phm_init_range: float | None = 0.0001
    learn_phm: bool | None = True
    hypercomplex_nonlinearity: str | None = "glorot-uniform"
    phm_rank: int | None = 1
    phm_bias: bool | None = True
    stochastic_depth: float | None = 0.0  # DropPath in training only: the identity in the exported (eval) forward

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str) -> MethodConfig:
        legacy = values.get("invertible_adapter")
        if "invertible_adapter" in values:
            # adapters v1 configs nest the invertible block; the reference maps it the same way.
            values = {k: v for k, v in values.items() if k != "invertible_adapter"}
            if legacy:
                if not isinstance(legacy, dict) or not {"block_type", "reduction_factor"} <= set(legacy):
                    raise UserError(f"{path}.invertible_adapter: expected {{\"block_type\": ..., "
                                    f"\"reduction_factor\": ...}}, got {legacy!r}.")
                values.update(inv_adapter=legacy["block_type"], inv_adapter_reduction_factor=legacy["reduction_factor"])
        return super().from_dict(values, path)

    def validate(self, path: str) -> None:
        for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before",
                    "ln_after", "adapter_residual_before_ln", "is_parallel", "use_gating", "phm_layer"):
            require_type(self, path, key, (bool,))
        if self.residual_before_ln not in (True, False, "post_add"):
            raise self.fail(path, "residual_before_ln", f"expected true, false or \"post_add\", got "
                            f"{self.residual_before_ln!r}.")
        if self.residual_before_ln == "post_add" and not self.original_ln_before and not self.is_parallel:
            raise self.fail(path, "residual_before_ln", "\"post_add\" takes the residual after the model's own "
                            "residual add, which needs original_ln_before true.")
        factors = self.reduction_factor.values() if isinstance(self.reduction_factor, dict) else [
            self.reduction_factor]
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0:
                raise self.fail(path, "reduction_factor", f"must be a number > 0, got {factor!r}.")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, int | float | str) or (
                isinstance(self.scaling, str) and self.scaling not in ("learned", "channel")):
            raise self.fail(path, "scaling", f"expected a number, \"learned\" or \"channel\", got {self.scaling!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        if not 0.0 <= (self.stochastic_depth or 0.0) < 1.0:
            raise self.fail(path, "stochastic_depth", f"must be in [0, 1), got {self.stochastic_depth!r}.")
        if self.init_weights not in INITS:
            raise self.fail(path, "init_weights", f"expected one of {list(INITS)}, got {self.init_weights!r}.")
        make_activation(self.non_linearity, f"{path}.non_linearity")
        if self.phm_layer:
            phm.validate(self, path)
        invertible.validate(self, path)
        if self.cross_adapter:
            raise self.fail(path, "cross_adapter", "cross-attention adapters are not supported by fxadapt yet; set "
                            "cross_adapter to false.")

    def reduction_for(self, layer: int, path: str) -> float:
        if not isinstance(self.reduction_factor, dict):
            return self.reduction_factor
        if str(layer) in self.reduction_factor:
            return self.reduction_factor[str(layer)]
        if "default" in self.reduction_factor:
            return self.reduction_factor["default"]
        raise self.fail(path, "reduction_factor", f"the mapping has no entry for layer {layer} and no "
                        "\"default\"; add e.g. {\"default\": 16}.")


_DOUBLE = dict(original_ln_before=False, mh_adapter=True, non_linearity="swish")
_PARALLEL = dict(original_ln_before=False, reduction_factor=2, init_weights="mam_adapter", is_parallel=True,
                 scaling=4.0)
_INV = dict(inv_adapter="nice", inv_adapter_reduction_factor=2)
_PHM = dict(phm_layer=True, reduction_factor=32, non_linearity="gelu")
# AdapterHub's ADAPTER_CONFIG_MAP (adapterplus is its AdapterPlusConfig class, which has no map entry).
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": {},
    "double_seq_bn": _DOUBLE,
    "par_bn": _PARALLEL,
    "scaled_par_bn": {**_PARALLEL, "scaling": "learned"},
    "seq_bn_inv": _INV,
    "double_seq_bn_inv": {**_DOUBLE, **_INV},
    "compacter++": _PHM,
    "compacter": {**_DOUBLE, **_PHM},
    "adapterplus": dict(original_ln_after=False, original_ln_before=True, residual_before_ln=False,
                        stochastic_depth=0.1, init_weights="houlsby", scaling="channel", reduction_factor=96,
                        non_linearity="gelu"),
}
ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn", "scaled_parallel": "scaled_par_bn",
           "pfeiffer+inv": "seq_bn_inv", "houlsby+inv": "double_seq_bn_inv"}


class Bottleneck(nn.Module):
    """The bottleneck block; attribute names mirror the reference `Adapter` so checkpoint keys map 1:1. Its
    methods are the one implementation the single emitter and composed sites (compose/bottleneck_site.py) share.

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


def reference_module(site: ResidualSite) -> str:
    """The reference's module for this site: the sub-layer's output module when the residual add
    happens inside it (BERT's SelfOutput/Output), else the layer's `attention_adapters`/`output_adapters`."""
    parent = site.projection_module.rpartition(".")[0]
    if site.module == parent:
        return f"{site.module}.adapters"
    slot = "output_adapters" if site.role == "residual.ffn" else "attention_adapters"
    return f"{site.module}.{slot}.adapters"


def _build(sites: SiteMap, config: Config, path: str) -> tuple[list[tuple[int, Bottleneck]], phm.SharedPHM | None]:
    """The adapter's module per residual site it adapts (index into sites.residuals), and Compacter's shared
    PHM tensors (one module for all layers) when the config shares them. The graph is not touched."""
    roles = (["residual.attn"] if config.mh_adapter else []) + (["residual.ffn"] if config.output_adapter else [])
    built: list[tuple[int, Bottleneck]] = []
    shared: phm.SharedPHM | None = None
    for index, site in enumerate(sites.residuals):
        if site.role not in roles or site.layer in config.leave_out:
            continue
        factor = config.reduction_for(site.layer, path)
        down = int(site.hidden_size // factor)
        if down < 1:
            raise UserError(f"{path}.reduction_factor: {factor} leaves no bottleneck for hidden size "
                            f"{site.hidden_size}; use a factor <= {site.hidden_size}.")
        if config.phm_layer:
            phm.check_sizes(config, site.hidden_size, down, factor, path)
            if shared is None and (config.shared_phm_rule or config.shared_W_phm):
                shared = freeze(phm.SharedPHM(config, site.hidden_size, down))
        names = tuple(shared.names) if shared else ()
        if shared and config.shared_W_phm and shared.get_parameter(names[0]).shape[1] != (
                site.hidden_size // config.phm_dim):
            raise UserError(f"{path}.shared_W_phm: sites of hidden size {site.hidden_size} and another size cannot "
                            "share one PHM weight; set shared_W_phm to false.")
        built.append((index, freeze(Bottleneck(site.hidden_size, down, config, names))))
    return built, shared


def composition_refusal(config: Config) -> str | None:
    return None  # every bottleneck config composes (PHM, invertible and AdapterPlus included)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """For a composed setup: the invertible block (compose/model_wide.py runs the setup's first adapter's), the
    shared PHM tensors (fed to every composed residual site) and the Bottleneck per residual site."""
    found = []
    if config.inv_adapter:
        found.append(SiteModule("invertible", 0, invertible.make_block(sites, config, path), "invertible_adapters"))
    built, shared = _build(sites, config, path)
    if shared is not None:
        # Outside every layer, like the reference's base_model.shared_parameters[NAME].
        found.append(SiteModule("shared", -1, shared, "shared_parameters"))
    return found + [SiteModule("residual", index, module, reference_module(sites.residuals[index]))
                    for index, module in built]


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    if config.inv_adapter:
        yield from invertible.emit(gm, sites, adapter, config, path)
    built, shared = _build(sites, config, path)
    shared_path = add_module(gm, adapter, "shared", shared) if shared is not None else None
    for index, module in built:
        site = sites.residuals[index]
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        yield Placement(adapter, NAME, site.role, site.layer, module_path, reference_module(site),
                        _rewrite(gm, site, module_path, module, adapter, shared_path, module.shared_names))
    if shared_path is not None:
        yield Placement(adapter, NAME, "shared", -1, shared_path, "shared_parameters", 0)


def _shared_inputs(emit: Emitter, shared_path: str | None, names: tuple[str, ...]) -> list[fx.Node]:
    """get_attr nodes for the shared PHM tensors, placed and tagged like every other inserted node."""
    nodes = []
    for name in names:
        with emit.graph.inserting_after(emit.cursor):
            node = emit.graph.get_attr(f"{shared_path}.{name}")
        meta.inherit_meta(node, emit.anchor, keep_val=False, **emit.origin)
        emit.created.append(node)
        emit.cursor = node
        nodes.append(node)
    return nodes


def _rewrite(gm: fx.GraphModule, site: ResidualSite, module_path: str, module: Bottleneck, adapter: str,
             shared_path: str | None, names: tuple[str, ...]) -> int:
    """The adapter's own pre_forward / post_forward on graph nodes: where they need the model's h + x (and its
    norm), the model's nodes are reused; other adds and norms are new nodes (the norm a copy of the model's)."""
    h, x, norm = site.hidden, site.residual, site.norm
    emit = Emitter(gm, site.output, {"adapter": adapter, "method": NAME, "pass": "insert_adapters",
                                     "site": site.role, "layer": site.layer})

    def add(a: fx.Node, b: fx.Node) -> fx.Node:
        if (a, b) == (h, x):
            return site.add
        return emit.call_function(aten.add.Tensor, (a, b))

    def layer_norm(t: fx.Node) -> fx.Node:
        return site.output if t is site.add else emit.copy(norm, {site.add: t})

    ln = layer_norm if norm is not None else None
    t, _, residual = module.pre_forward(h, x, ln, add=add)
    adapted = emit.call_module(module_path, (t, residual, *_shared_inputs(emit, shared_path, names)))
    emit.reroute(site.output, module.post_forward(adapted, h, x, ln, add=add))
    return len(emit.created)
