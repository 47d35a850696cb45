"""Invertible adapters (MAD-X, Pfeiffer et al. 2020) as in `adapters` 1.3.0: `seq_bn_inv`, `double_seq_bn_inv`.

A coupling block transforms the embeddings output e (the residual stream entering layer 0), split
in halves e = [x1, x2] along the features (x1 has floor(H/2) features):

    NICE:  y1 = x1 + F(x2);            y2 = x2 + G(y1)            F, G = Linear -> act -> Linear
    GLOW:  y1 = e(s2(x2)_s) * x1 + s2(x2)_t;  y2 = e(s1(y1)_s) * x2 + s1(y1)_t,
           e(s) = exp(clamp * 0.636 * atan(s / clamp)), clamp = 5

with subnets of width int(in // inv_adapter_reduction_factor) and the adapter's non_linearity. Its
inverse (NICE: x2 = y2 - G(y1); x1 = y1 - F(x2)) runs on the input of the LM head's output
projection, when the model has one: the projection that shares the token-embedding weight (tied),
or, untied, a projection onto the vocabulary (weight shaped like the token embedding) whose output
is a model output. Models without an LM head get the forward direction only.
Checkpoint keys: `invertible_adapters.NAME.F.0.weight` (GLOW: `s1`, `s2`).
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Iterator

import torch
from torch import fx, nn

from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import ADDMM, LINEAR, PASS_THROUGH, aten, is_call, weight_node
from ...sites import SiteMap
from ..activation import make_activation
from ..base import Placement, freeze

METHOD = "bottleneck"
BLOCKS = ("nice", "glow")


def _subnet(dims_in: int, dims_out: int, reduction_factor: float, non_linearity: str) -> nn.Sequential:
    width = int(dims_in // reduction_factor)
    return nn.Sequential(nn.Linear(dims_in, width), make_activation(non_linearity, "non_linearity"),
                         nn.Linear(width, dims_out))


def _init_bert(module: nn.Module) -> None:
    # The reference applies Adapter.init_bert_weights to the whole block.
    with torch.no_grad():
        for linear in module.modules():
            if isinstance(linear, nn.Linear):
                linear.weight.normal_(0.0, 0.02)
                nn.init.zeros_(linear.bias)


class NICECoupling(nn.Module):
    """Additive coupling; attribute names mirror the reference `NICECouplingBlock` (F, G)."""

    def __init__(self, channels: int, non_linearity: str, reduction_factor: float) -> None:
        super().__init__()
        self.split_len1 = channels // 2
        self.split_len2 = channels - channels // 2
        self.F = _subnet(self.split_len2, self.split_len1, reduction_factor, non_linearity)
        self.G = _subnet(self.split_len1, self.split_len2, reduction_factor, non_linearity)
        _init_bert(self)

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., :self.split_len1], x[..., self.split_len1:]
        if not rev:
            y1 = x1 + self.F(x2)
            y2 = x2 + self.G(y1)
        else:
            y2 = x2 - self.G(x1)
            y1 = x1 - self.F(y2)
        return torch.cat((y1, y2), -1)


class GLOWCoupling(nn.Module):
    """Affine coupling (FrEIA's GLOWCouplingBlock) on the feature dim; names mirror the reference (s1, s2).

    The reference's forward direction uses x1/x2 themselves as scale and shift and slices the sequence
    dim, so it fails on [batch, seq, hidden] inputs; this follows the Glow/RealNVP paper (see
    docs/reference-deviations.md). Its reverse direction is the reference's, sliced on the feature dim.
    """

    clamp = 5.0

    def __init__(self, channels: int, non_linearity: str, reduction_factor: float) -> None:
        super().__init__()
        self.split_len1 = channels // 2
        self.split_len2 = channels - channels // 2
        self.s1 = _subnet(self.split_len1, self.split_len2 * 2, reduction_factor, non_linearity)
        self.s2 = _subnet(self.split_len2, self.split_len1 * 2, reduction_factor, non_linearity)
        _init_bert(self)

    def e(self, s: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.clamp * 0.636 * torch.atan(s / self.clamp))

    def forward(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        x1, x2 = x[..., :self.split_len1], x[..., self.split_len1:]
        if not rev:
            r2 = self.s2(x2)
            y1 = self.e(r2[..., :self.split_len1]) * x1 + r2[..., self.split_len1:]
            r1 = self.s1(y1)
            y2 = self.e(r1[..., :self.split_len2]) * x2 + r1[..., self.split_len2:]
        else:
            r1 = self.s1(x1)
            y2 = (x2 - r1[..., self.split_len2:]) / self.e(r1[..., :self.split_len2])
            r2 = self.s2(y2)
            y1 = (x1 - r2[..., self.split_len1:]) / self.e(r2[..., :self.split_len1])
        return torch.cat((y1, y2), -1)


def validate(config, path: str) -> None:
    if config.inv_adapter is None:
        return
    if config.inv_adapter not in BLOCKS:
        raise config.fail(path, "inv_adapter", f"expected null, \"nice\" or \"glow\", got {config.inv_adapter!r}.")
    factor = config.inv_adapter_reduction_factor
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0 or math.isinf(factor):
        raise config.fail(path, "inv_adapter_reduction_factor", f"must be a number > 0 when inv_adapter is set, "
                          f"got {factor!r}.")


def _output_projections(gm: fx.GraphModule) -> list[fx.Node]:
    """Projections onto the vocabulary whose output is a model output (the LM head's decoder)."""
    embeddings = [n for n in gm.graph.nodes if is_call(n, {aten.embedding.default})
                  and isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"]
    tables = {n.args[0].target for n in embeddings}
    token = [n for n in embeddings if isinstance(n.args[1], fx.Node) and n.args[1].op == "placeholder"]
    token_shape = tuple(_tensor(gm, token[0].args[0].target).shape) if token else None
    found = []
    for node in gm.graph.nodes:
        weight = weight_node(node)
        if weight is None or not _reaches_output(node):
            continue
        if weight.target in tables:  # tied to an embedding table
            found.append(node)
        elif is_call(node, LINEAR) and tuple(_tensor(gm, weight.target).shape) == token_shape:
            found.append(node)
    return found


def _tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    return functools.reduce(getattr, target.split("."), gm)


def _reaches_output(node: fx.Node) -> bool:
    queue, seen = deque([node]), set()
    while queue:
        current = queue.popleft()
        for user in current.users:
            if user.op == "output":
                return True
            if user not in seen and is_call(user, PASS_THROUGH):
                seen.add(user)
                queue.append(user)
    return False


def make_block(sites: SiteMap, config, path: str) -> nn.Module:
    """The adapter's coupling block, sized by the embeddings output (the residual stream entering layer 0)."""
    embeddings = sites.embeddings
    if embeddings is None:
        raise UserError(f"{path}.inv_adapter: no embeddings output was found in this model (the residual stream "
                        "entering the first layer); set inv_adapter to null.")
    val = embeddings.meta.get("val")
    channels = int(val.shape[-1]) if val is not None else sites.residuals[0].hidden_size
    block = NICECoupling if config.inv_adapter == "nice" else GLOWCoupling
    return freeze(block(channels, config.non_linearity, config.inv_adapter_reduction_factor))


def wire(gm: fx.GraphModule, sites: SiteMap, adapter: str, module_path: str, pass_name: str = "insert_adapters") -> int:
    """Forward coupling after the embeddings; its inverse before the LM head's output projection. Returns the
    number of nodes inserted."""
    embeddings = sites.embeddings
    origin = {"adapter": adapter, "method": METHOD, "pass": pass_name, "site": "embeddings", "layer": -1}
    forward = Emitter(gm, embeddings, origin)
    forward.reroute(embeddings, forward.call_module(module_path, (embeddings,)))
    count = len(forward.created)
    for projection in _output_projections(gm):
        x = projection.args[1] if is_call(projection, ADDMM) else projection.args[0]
        reverse = Emitter(gm, x, {**origin, "site": "lm_head"})
        projection.replace_input_with(x, reverse.call_module(module_path, (x, True)))
        count += len(reverse.created)
    return count


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config, path: str) -> Iterator[Placement]:
    module_path = add_module(gm, adapter, "invertible", make_block(sites, config, path))
    yield Placement(adapter, METHOD, "embeddings", -1, module_path, "invertible_adapters",
                    wire(gm, sites, adapter, module_path))
