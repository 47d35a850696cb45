"""Prefix tuning (Li & Liang, 2021) as in `adapters` 1.3.0: every attention core sees P learned key/value
positions before the sequence, attended by every query.

Per attention core of layer l (its j-th prefixed core at one location):

    K' = [P_k(j) ; K],  V' = [P_v(j) ; V]  along the key axis,  mask' = [attend^P ; mask]
    [P_k(j), P_v(j)] = split of  control_trans(wte)  (reparametrized: Linear -> tanh -> Linear)
                       or of a learned flat vector   (`flat=True`, `prefix_tuning_flat`),
    viewed as (P, 2·n_layers, kv_heads, head_dim); key = slice 2j, value = slice 2j+1.

The prefixes have the key projection's head count (GQA models: the KV heads), are repeated per head
group like the model repeats its keys, are not rotated by RoPE (they join after it, as in the
reference) and are shared over the batch. All prefixes of one location come from one shared module
(the reference's PrefixTuningPool); its checkpoint keys appear once per attention module and once
at the model's `prefix_tuning`, all equal. Locations: `self_prefix` (self-attention),
`encoder_prefix` (encoder self-attention of an encoder-decoder), `cross_prefix` (cross-attention).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ...attention_sites import AttentionCore, emitter_before, find_attention_cores, pad_mask
from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import ADDMM, aten, is_call
from ...sites import SiteMap
from ..activation import make_activation
from ..base import MethodConfig, Placement, SiteModule, freeze, require_type

NAME = "prefix_tuning"
# The reference's PrefixTuningLayer.supported_compositions.
BLOCKS: tuple[str, ...] = ("stack", "parallel", "batch_split")
LOCATIONS = ("self_prefix", "encoder_prefix", "cross_prefix")
POOL_KEY = "prefix_tuning.prefix_tunings"  # the model-level pool; each attention module saves it too (aliases)
# The reference names a location `self_prefix` in most models and `self` in some (DistilBERT).
_LOCATION_ALIASES = {"self_prefix": ("self",), "encoder_prefix": ("encoder",), "cross_prefix": ("cross",)}


@dataclass
class Config(MethodConfig):
    """AdapterHub's PrefixTuningConfig."""

    architecture = "prefix_tuning"
    encoder_prefix: bool = True
    cross_prefix: bool = True
    leave_out: list[int] = field(default_factory=list)
    flat: bool = False
    prefix_length: int = 30
    bottleneck_size: int = 512
    non_linearity: str = "tanh"
    dropout: float = 0.0
    use_gating: bool = False
    shared_gating: bool = True
    init_weights_seed: int | None = None

    def validate(self, path: str) -> None:
        for key in ("encoder_prefix", "cross_prefix", "flat", "use_gating", "shared_gating"):
            require_type(self, path, key, (bool,))
        for key in ("prefix_length", "bottleneck_size"):
            require_type(self, path, key, (int,))
            if getattr(self, key) < 1:
                raise self.fail(path, key, f"must be a positive integer, got {getattr(self, key)}.")
        if not isinstance(self.leave_out, list) or not all(isinstance(i, int) for i in self.leave_out):
            raise self.fail(path, "leave_out", f"expected a list of layer indices, got {self.leave_out!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise self.fail(path, "dropout", f"must be in [0, 1), got {self.dropout!r}.")
        if not self.flat:
            make_activation(self.non_linearity, f"{path}.non_linearity")


PRESETS = {"prefix_tuning": {}, "prefix_tuning_flat": {"flat": True}}
ALIASES: dict[str, str] = {}


class PrefixTuning(nn.Module):
    """The reference's reparametrized PrefixTuning: an MLP maps P learned embeddings to all prefixes."""

    def __init__(self, n_layers: int, n_heads: int, input_size: int, head_dim: int, config: Config) -> None:
        super().__init__()
        self.shape = (config.prefix_length, n_layers * 2, n_heads, head_dim)
        self.wte = nn.Embedding(config.prefix_length, input_size)
        self.control_trans = nn.Sequential(
            nn.Linear(input_size, config.bottleneck_size),
            make_activation(config.non_linearity, "non_linearity"),
            nn.Linear(config.bottleneck_size, n_layers * 2 * n_heads * head_dim),
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self) -> torch.Tensor:
        # wte(arange(P)) is wte.weight; the reference repeats this per batch row, identically.
        prefixes = self.control_trans(self.wte.weight).view(self.shape).permute(1, 2, 0, 3)
        return self.dropout(prefixes)  # (2·n_layers, heads, P, head_dim)


class FlatPrefixTuning(nn.Module):
    """The reference's FlatPrefixTuning: the prefixes are one learned vector."""

    def __init__(self, n_layers: int, n_heads: int, input_size: int, head_dim: int, config: Config) -> None:
        super().__init__()
        self.shape = (config.prefix_length, n_layers * 2, n_heads, head_dim)
        self.control_trans = nn.Parameter(torch.randn(config.prefix_length * n_layers * 2 * n_heads * head_dim))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self) -> torch.Tensor:
        return self.dropout(self.control_trans.view(self.shape).permute(1, 2, 0, 3))


class PrefixGroup(nn.Module):
    """One location's prefix module, registered under the location's name as the reference's pool does."""

    def __init__(self, location: str, prefixes: nn.Module) -> None:
        super().__init__()
        self.location = location
        self.add_module(location, prefixes)

    def forward(self) -> torch.Tensor:
        return self._modules[self.location]()

    def match_checkpoint(self, keys, prefix: str) -> None:
        """Rename the location to the checkpoint's spelling (`self` vs `self_prefix`) before loading."""
        if any(k.startswith(f"{prefix}{self.location}.") for k in keys):
            return
        for alias in _LOCATION_ALIASES.get(self.location, ()):
            if any(k.startswith(f"{prefix}{alias}.") for k in keys):
                self._modules[alias] = self._modules.pop(self.location)
                self.location = alias
                return


def _location(core: AttentionCore, encoder_decoder: bool, decoder_layers: set[int]) -> str:
    if core.cross:
        return "cross_prefix"
    if encoder_decoder and core.layer not in decoder_layers:
        return "encoder_prefix"
    return "self_prefix"


def groups(cores: list[AttentionCore], config: Config, path: str) -> dict[str, list[AttentionCore]]:
    """The attention cores this prefix adapter acts on, by location (in graph order)."""
    decoder_layers = {c.layer for c in cores if c.cross}
    found: dict[str, list[AttentionCore]] = {}
    for core in cores:
        location = _location(core, bool(decoder_layers), decoder_layers)
        if core.layer in config.leave_out or not getattr(config, location, True):
            continue
        found.setdefault(location, []).append(core)
    if not found:
        raise UserError(f"{path}: no attention core is left for this prefix (leave_out={config.leave_out}, "
                        f"encoder_prefix={config.encoder_prefix}, cross_prefix={config.cross_prefix}).")
    for location, members in found.items():
        first = members[0]
        if any((c.kv_heads, c.head_dim, c.hidden_size) != (first.kv_heads, first.head_dim, first.hidden_size)
               for c in members):
            raise UserError(f"{path}: attention layers at {location} differ in head count or size; one prefix "
                            "module cannot serve them.")
    return found


def attention_cores(gm: fx.GraphModule, sites: SiteMap, path: str) -> list[AttentionCore]:
    cores = find_attention_cores(gm, sites)
    if not cores:
        raise UserError(f"{path}: prefix tuning needs attention cores (scaled_dot_product_attention or "
                        "softmax(q·kᵀ)·v); none were found in this model.")
    return cores


def aliases(cores: list[AttentionCore]) -> list[str]:
    """Every reference attention module holds the shared pool, so each of them saves the prefixes."""
    return [POOL_KEY] + sorted({f"{c.module}.prefix_tuning.pool.prefix_tunings" for c in cores})


def make_group(location: str, members: list[AttentionCore], config: Config) -> PrefixGroup:
    first = members[0]
    cls = FlatPrefixTuning if config.flat else PrefixTuning
    group_class = getattr(config, "group_class", PrefixGroup)  # a swappable slot's pool carries a mask (slot.py)
    group = group_class(location, cls(len(members), first.kv_heads, first.hidden_size, first.head_dim, config))
    group.config = config  # what a composed site needs (site.py); a union's member config, not the union's
    return freeze(group)


def composition_refusal(config: Config) -> str | None:
    return None  # gated or not, flat or not: every prefix config joins its BLOCKS (site.py)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """One prefix pool per location (index into LOCATIONS); site.py joins the pools per core."""
    found = groups(attention_cores(gm, sites, path), config, path)
    return [SiteModule("prefix", LOCATIONS.index(location), make_group(location, members, config), POOL_KEY)
            for location, members in found.items()]


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    cores = attention_cores(gm, sites, path)
    references = aliases(cores)
    for location, members in groups(cores, config, path).items():
        module_path = add_module(gm, adapter, f"prefix_{location}", make_group(location, members, config))
        gates = _gates(gm, sites, members, config, adapter, location) if config.use_gating else {}
        inserted = _rewrite(gm, members, module_path, config, adapter, location, gates)
        for index, reference in enumerate(references):
            yield Placement(adapter, NAME, "attn.prefix", -1, module_path, reference, inserted if index == 0 else 0)
        for core in members if gates else []:
            yield gate_placement(adapter, core, gates[core.node][0])


def _gates(gm: fx.GraphModule, sites: SiteMap, cores: list[AttentionCore], config: Config, adapter: str,
           location: str) -> dict[fx.Node, tuple[str, fx.Node]]:
    """UniPELT's gate per attention layer (see `gate_scores`), registered per core."""
    return {core.node: (add_module(gm, adapter, gate_site(core, location), make_gate(core, config)),
                        gate_input(sites, core)) for core in cores}


def gate_site(core: AttentionCore, location: str) -> str:
    """The gate's site name under `fxadapt.<adapter>` (the same alone and in a composition)."""
    return f"prefix_gate_L{core.layer}_{location}"


def make_gate(core: AttentionCore, config: Config) -> nn.Linear:
    """The reference's prefix gate: Linear(hidden, 1 if shared_gating else 2), weight ~ N(0, 0.02²)."""
    gate = nn.Linear(core.hidden_size, 1 if config.shared_gating else 2)
    nn.init.normal_(gate.weight, std=0.02)
    return freeze(gate)


def gate_placement(adapter: str, core: AttentionCore, module_path: str) -> Placement:
    """A gate's tensors are the reference's `<attention module>.prefix_tuning.prefix_gates.<adapter>.*`."""
    return Placement(adapter, NAME, "attn.prefix_gate", core.layer, module_path,
                     f"{core.module}.prefix_tuning.prefix_gates", 0)


def gate_input(sites: SiteMap, core: AttentionCore) -> fx.Node:
    """The attention's input x (the reference's residual_input): the input of the layer's query projection."""
    roles = ("xattn.q",) if core.cross else ("attn.q", "attn.qkv")
    site = next((s for s in sites.linears if s.layer == core.layer and s.role in roles), None)
    if site is None:
        raise UserError(f"gated prefix tuning needs the query projection of layer {core.layer} to find the "
                        "attention's input; none was found.")
    projection = site.nodes[0]
    return projection.args[1] if is_call(projection, ADDMM) else projection.args[0]


def gate_scores(em: Emitter, gate_path: str, x: fx.Node) -> fx.Node:
    """g = mean_seq(sigmoid(W x + b)), (batch, 1 or 2): the prefix keys are scaled by g[:, 0], the values by
    g[:, -1] (one gate for both if shared_gating)."""
    scores = em.call_module(gate_path, (x,), keep_val=False)
    scores = em.call_function(aten.sigmoid.default, (scores,), keep_val=False)
    return em.call_function(aten.mean.dim, (scores, [1]), keep_val=False)


def _rewrite(gm: fx.GraphModule, cores: list[AttentionCore], module_path: str, config: Config, adapter: str,
             location: str, gates: dict[fx.Node, tuple[str, fx.Node]]) -> int:
    origin = {"adapter": adapter, "method": NAME, "pass": "insert_adapters", "site": f"attn.{location}",
              "layer": cores[0].layer}
    nodes = list(gm.graph.nodes)
    start = min((c.key_user[0] for c in cores), key=nodes.index)
    pool_emitter = emitter_before(gm, start, origin)
    pool = pool_emitter.call_module(module_path, (), keep_val=False)
    created = len(pool_emitter.created)
    masks: dict[tuple, fx.Node] = {}
    join_mask = getattr(gm.get_submodule(module_path), "join_mask", None)  # a swappable slot's pool (slot.py)
    for index, core in enumerate(cores):
        here = {**origin, "layer": core.layer}
        gate = None
        if core.node in gates:
            gate_path, x = gates[core.node]
            em = emitter_before(gm, core.key_user[0], here)
            gate = gate_scores(em, gate_path, x)
            created += len(em.created)
        for slot, (user, arg) in enumerate((core.key_user, core.value_user)):
            created += _prepend(gm, core, user, arg, pool, 2 * index + slot, here, slot == 0, gate)
        if join_mask is not None:
            created += join_mask(gm, core, module_path, here, masks)
        else:
            created += extend_mask(gm, core, config.prefix_length, here, masks)
    return created + (0 if join_mask else len(masks))


def _prepend(gm: fx.GraphModule, core: AttentionCore, user: fx.Node, arg: int, pool: fx.Node, index: int,
             origin: dict, is_key: bool, gate: fx.Node | None = None) -> int:
    """user.args[arg] <- cat([prefix expanded over the batch, operand]) on the key axis."""
    operand = user.args[arg]
    em = emitter_before(gm, user, origin)
    prefix = em.call_function(aten.select.int, (pool, 0, index), keep_val=False)  # (kv_heads, P, d)
    if core.heads != core.kv_heads:  # grouped-query attention: repeat like the model's repeat_kv
        repeat = core.heads // core.kv_heads
        prefix = em.call_function(aten.unsqueeze.default, (prefix, 1), keep_val=False)
        prefix = em.call_function(aten.expand.default, (prefix, [core.kv_heads, repeat, -1, -1]), keep_val=False)
        prefix = em.call_function(aten.reshape.default, (prefix, [core.heads, -1, core.head_dim]), keep_val=False)
    prefix = em.call_function(aten.unsqueeze.default, (prefix, 0), keep_val=False)
    batch = em.call_function(aten.sym_size.int, (operand, 0))
    prefix = em.call_function(aten.expand.default, (prefix, [batch, -1, -1, -1]), keep_val=False)
    if gate is not None:  # keys by the gate's first output, values by its last
        factor = em.call_function(aten.select.int, (gate, 1, 0 if is_key else -1), keep_val=False)
        factor = em.call_function(aten.view.default, (factor, [-1, 1, 1, 1]), keep_val=False)
        prefix = em.call_function(aten.mul.Tensor, (prefix, factor), keep_val=False)
    axis = core.key_axis if is_key else -2
    if axis == -1:  # eager attention multiplies by kᵀ
        prefix = em.call_function(aten.transpose.int, (prefix, -1, -2), keep_val=False)
    joined = em.call_function(aten.cat.default, ([prefix, operand], axis), keep_val=False)
    args = list(user.args)
    args[arg] = joined
    user.args = tuple(args)
    return len(em.created)


def extend_mask(gm: fx.GraphModule, core: AttentionCore, length: int, origin: dict,
                 cache: dict[tuple, fx.Node]) -> int:
    """Every query attends the prefix: prepend `length` "attend" entries on the mask's key axis."""
    if core.mask is not None:
        core.mask.replace(pad_mask(gm, core.mask.node, {-1: length}, core.mask.attend, origin, cache))
        return 0
    if not core.causal:
        return 0
    # sdpa(is_causal=True) has no mask to extend: write the causal mask out, prefix columns first.
    em = emitter_before(gm, core.node, origin)
    query = core.node.args[0]
    length_q = em.call_function(aten.sym_size.int, (query, -2))  # causal cores are self-attention: q and k align
    ones = em.call_function(aten.new_ones.default, (query, [length_q, length_q]), {"dtype": torch.bool},
                            keep_val=False)
    causal = em.call_function(aten.tril.default, (ones,), keep_val=False)
    mask = em.call_function(aten.constant_pad_nd.default, (causal, [length, 0], True), keep_val=False)
    args = list(core.node.args[:3])
    kwargs = {k: v for k, v in core.node.kwargs.items() if k not in ("attn_mask", "is_causal")}
    for position, name in ((4, "dropout_p"), (6, "scale"), (7, "enable_gqa")):
        if len(core.node.args) > position:
            kwargs[name] = core.node.args[position]
    core.node.args = tuple(args)
    core.node.kwargs = {**kwargs, "attn_mask": mask, "is_causal": False}
    return len(em.created)
