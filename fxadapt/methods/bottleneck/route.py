"""Per-row routing of bottleneck adapters at one residual site (passes/route_rows.py): a BottleneckSite whose setup
is `{"multi_task": [a, b, ...]}` of single adapters becomes one RoutedBottleneck holding the children's weights
stacked. With the children's shared pre/post steps (module.py `Bottleneck.pre_forward` / `post_forward`):

    t, _, r = pre(h, x, LN)
    u = act(t Wd[k]^T + bd[k]) Wu[k]^T + bu[k]          k = slot of task_ids[row]; s folded into Wu, bu
    y = post(u + r  (sequential) | u  (parallel), h, x, LN)
    rows of id -1 or of a child absent here: LN(h + x), the model's own output

Down and up projections (nn.Linear, or Compacter's PHM layers as the dense matrix they equal) are stacked
[N + 1, ...] and zero-padded to the largest bottleneck: padded units meet zero columns of Wu, so they add
nothing whatever act(0) is. Routing needs the present children to agree on everything outside the two
projections (pre/post options, activation) and to have no per-adapter norm or gate; otherwise the site is left
alone and `route_residual` says why. Inference only (dropout and stochastic depth are the identity in eval).
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import fx, nn
from torch.nn import functional as F

from ...compose.task_inputs import check_task_ids, routable_children, route_index
from ...graph_edit import stored_tensor
from .module import Bottleneck
from .phm import PHMLayer
from .site import BottleneckSite

# The Bottleneck attributes pre_forward / post_forward read: children must agree on them to share one pre/post.
FLAGS = ("parallel", "original_ln_before", "original_ln_after", "residual_before_ln")


class RoutedBottleneck(nn.Module):
    """`forward(h, x, ln_weight, ln_bias, task_ids)` -> the site's output (see the module docstring)."""

    def __init__(self, names: list[str], flags: dict, act: nn.Module, stacks: dict[str, torch.Tensor],
                 norm: tuple[list[int], float] | None, where: str) -> None:
        super().__init__()
        self.names, self.where, self.norm = names, where, norm
        self.flags = SimpleNamespace(**flags)
        self.act = act
        for key, value in stacks.items():  # down_weight [N+1, D, H], down_bias, up_weight [N+1, H, D], up_bias, acts
            self.register_buffer(key, value)

    def forward(self, h: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor | None,
                ln_bias: torch.Tensor | None, task_ids: torch.Tensor) -> torch.Tensor:
        check_task_ids(task_ids, len(self.names), self.where)
        slot = route_index(task_ids, len(self.names))

        def ln(t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, self.norm[0], ln_weight, ln_bias, self.norm[1])

        layer_norm = ln if self.norm is not None else None
        t, _, residual = Bottleneck.pre_forward(self.flags, h, x, layer_norm)
        rows = t.shape[0]
        flat = t.reshape(rows, -1, t.shape[-1])
        down = torch.bmm(flat, self.down_weight.index_select(0, slot).transpose(1, 2))
        down = self.act(down + self.down_bias.index_select(0, slot).unsqueeze(1))
        up = torch.bmm(down, self.up_weight.index_select(0, slot).transpose(1, 2))
        up = (up + self.up_bias.index_select(0, slot).unsqueeze(1)).view(t.shape)
        out = up if self.flags.parallel else up + residual
        routed = Bottleneck.post_forward(self.flags, out, h, x, layer_norm)
        base = layer_norm(h + x) if layer_norm is not None else h + x
        mask = self.acts.index_select(0, slot).view(-1, *[1] * (h.dim() - 1))
        return torch.where(mask, routed, base)


def route_residual(gm: fx.GraphModule, node: fx.Node, site: nn.Module) -> tuple[nn.Module, tuple] | str:
    """(RoutedBottleneck, its call's args) replacing one BottleneckSite call `node`, or why the site is left alone."""
    assert isinstance(site, BottleneckSite)
    children = routable_children(site.branches, getattr(site, "multi_task", False))
    if isinstance(children, str):
        return children
    h, x, ln_weight, ln_bias, *shared_nodes, task_ids = node.args
    shared: dict[str, dict[str, torch.Tensor]] = {}
    for (adapter, tensor), arg in zip(site.shared_layout, shared_nodes, strict=True):
        value = stored_tensor(gm, arg)
        if value is None:
            return f"adapter {adapter!r}'s shared PHM tensor {tensor} is not a stored tensor"
        shared.setdefault(adapter, {})[tensor] = value
    present = [n for n in children if n in site.adapters]
    if not present:
        return "no child of the multi_task block acts at this site"
    modules = {n: site.adapters[n] for n in present}
    reason = _refusal(modules)
    if reason is not None:
        return reason
    first = modules[present[0]]
    with torch.no_grad():
        dense = {n: _dense(m, shared.get(n, {})) for n, m in modules.items()}
    stacks = _stack(children, dense)
    flags = {k: getattr(first, k) for k in FLAGS}
    routed = RoutedBottleneck(children, flags, copy.deepcopy(first.adapter_down[-1]), stacks,
                              site.norm, str(node.target))
    return routed, (h, x, ln_weight, ln_bias, task_ids)


def _refusal(modules: dict[str, Bottleneck]) -> str | None:
    """Why these children cannot share one routed pre/post, or None."""
    for name, m in modules.items():
        for part in ("adapter_norm_before", "adapter_norm_after", "gate"):
            if hasattr(m, part):
                return f"adapter {name!r} has a per-adapter {part}, which routing does not stack"
        if len(m.adapter_down) != 2:
            return f"adapter {name!r}'s down-projection is not a projection and an activation"
    keys = {name: (tuple(getattr(m, k) for k in FLAGS), repr(m.adapter_down[-1])) for name, m in modules.items()}
    if len(set(keys.values())) > 1:
        return ("the children differ in pre/post options or activation (" + "; ".join(
            f"{n}: {k}" for n, k in keys.items()) + "), so no one routed module computes them all")
    return None


def _linear(layer: nn.Module, shared: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) of a projection: nn.Linear's own, or a PHM layer's dense matrix (its forward on the
    identity: each output is one product, so the matrix is exact)."""
    if isinstance(layer, PHMLayer):
        probe = torch.eye(_phm_in(layer, shared))
        dense = layer(probe, shared)
        bias = layer.b if layer.b is not None else torch.zeros(dense.shape[1])
        return (dense - bias).t(), bias.detach().clone()
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.weight.shape[0])
    return layer.weight.detach().clone(), bias.detach().clone()


def _phm_in(layer: PHMLayer, shared: dict[str, torch.Tensor]) -> int:
    """A PHM layer's input size: phm_dim times the rows of its (possibly shared, possibly factorized) W."""
    prefix = f"W_{layer.position}" if layer.shared_w else "W"
    if layer.factorized_w:
        left = shared.get(f"{prefix}_left") if layer.shared_w else layer.W_left
        return left.shape[0] * left.shape[1]
    weight = shared.get(prefix) if layer.shared_w else layer.W
    return weight.shape[0] * weight.shape[1]


def _dense(m: Bottleneck, shared: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(Wd, bd, Wu, bu) of one adapter, its scaling folded into the up-projection."""
    down_w, down_b = _linear(m.adapter_down[0], shared)
    up_w, up_b = _linear(m.adapter_up, shared)
    scale = m.scaling.detach() if isinstance(m.scaling, torch.Tensor) else torch.tensor(float(m.scaling))
    scale = scale.reshape(-1).expand(up_w.shape[0]) if scale.numel() == 1 else scale
    return down_w, down_b, up_w * scale[:, None], up_b * scale


def _stack(children: list[str], dense: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """[N + 1, ...] stacks (slot N and absent children: zeros, acts False), bottlenecks zero-padded."""
    slots = len(children) + 1
    some = next(iter(dense.values()))
    hidden, dtype = some[0].shape[1], some[0].dtype
    size = max(d[0].shape[0] for d in dense.values())
    stacks = {"down_weight": torch.zeros(slots, size, hidden, dtype=dtype),
              "down_bias": torch.zeros(slots, size, dtype=dtype),
              "up_weight": torch.zeros(slots, hidden, size, dtype=dtype),
              "up_bias": torch.zeros(slots, hidden, dtype=dtype),
              "acts": torch.zeros(slots, dtype=torch.bool)}
    for k, name in enumerate(children):
        if name not in dense:
            continue
        down_w, down_b, up_w, up_b = dense[name]
        d = down_w.shape[0]
        stacks["down_weight"][k, :d] = down_w
        stacks["down_bias"][k, :d] = down_b
        stacks["up_weight"][k, :, :d] = up_w
        stacks["up_bias"][k] = up_b
        stacks["acts"][k] = True
    return stacks
