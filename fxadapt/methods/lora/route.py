"""Per-row routing of LoRA-family adapters at one projection (passes/route_rows.py): a `{"multi_task": [a, b,
...]}` site whose children are single adapters becomes one RoutedLinear holding every child's weights stacked.

Every routable module's output at y = W x + b is affine in y and low-rank in x:

    y'_i = g_i ⊙ y + B_i (A_i x) + c_i          g_i, c_i: [out]; A_i: [r_i, in]; B_i: [out, r_i], scaling folded
    LoRA        g = 1,  A = lora_A,        B = s·lora_B,                c = 0
    PEFT LoRA   g = 1,  A = lora_A,        B = s·lora_B,                c = s·b_B
    VeRA        g = 1,  A = Λ_d A_shared,  B = s·Λ_b B_shared,          c = 0
    (IA)^3      g = α·l (rank 0)
    DoRA        g = f,  A = lora_A,        B = f ⊙ s·lora_B,            c = 0          f = m / ||W + B A||_row
    PEFT DoRA   g = f,  A = lora_A,        B = f ⊙ s·lora_B,            c = (1 - f) ⊙ b + f ⊙ s·b_B
    DVoRA       as VeRA with g = f and B scaled by f

Row r reads slot k = task_ids[r] of the stacks [N + 1, ...] (ranks zero-padded to the largest: exact), slot N
being "no adapter" (g = 1, A = B = c = 0, so y' = y exactly); the products are two batched matmuls whatever N
is. The stacks are computed once from the modules (like merge_lora's folds), so the routed site is for
inference. Gated modules (their gate averages over the sequence), fused q/k/v chunks and modules of other
kinds (MTL-LoRA) are not routed: `terms` returns why.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx, nn

from ...compose.task_inputs import check_task_ids, routable_children, route_index
from ...graph_edit import stored_tensor
from .dora import DoRA, oriented, row_norm
from .ia3 import IA3
from .module import LoRA
from .peft import PeftDoRA, PeftLoRA
from .site import LoRASite
from .vera import VeRA, VeRADoRA


class Terms(NamedTuple):
    """One adapter's y' = g ⊙ y + B (A x) + c at one projection (None: g = 1 / no low-rank part / c = 0)."""

    g: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None
    c: torch.Tensor | None


def _lora(m: LoRA, weight, bias, shared) -> Terms:
    return Terms(None, m.lora_A, m.lora_B * m.scaling, None)


def _dora(m: DoRA, weight, bias, shared) -> Terms:
    f = m.m.weight.view(-1) / row_norm(oriented(weight, m.transposed) + m.product())
    return Terms(f, m.lora_A, f[:, None] * m.lora_B * m.scaling, None)


def _peft(m: PeftLoRA, weight, bias, shared) -> Terms:
    c = m.lora_B.bias * m.scaling if m.lora_B.bias is not None else None
    return Terms(None, m.lora_A.weight, m.lora_B.weight * m.scaling, c)


def _peft_dora(m: PeftDoRA, weight, bias, shared) -> Terms:
    f = m.lora_magnitude_vector / row_norm(oriented(weight, m.transposed) + m.delta_weight())
    c = (1 - f) * bias if bias is not None else None
    if m.lora_B.bias is not None:
        c = (c if c is not None else 0) + f * m.lora_B.bias * m.scaling
    return Terms(f, m.lora_A.weight, f[:, None] * m.lora_B.weight * m.scaling, c)


def _vera(m: VeRA, weight, bias, shared) -> Terms:
    lora_A, lora_B = shared
    return Terms(None, m.vera_D @ lora_A, m.vera_B @ lora_B * m.scaling, None)


def _dvora(m: VeRADoRA, weight, bias, shared) -> Terms:
    lora_A, lora_B = shared
    f = m.m.weight.view(-1) / row_norm(oriented(weight, m.transposed) + m.product(lora_A, lora_B))
    return Terms(f, m.vera_D @ lora_A, f[:, None] * (m.vera_B @ lora_B) * m.scaling, None)


def _ia3(m: IA3, weight, bias, shared) -> Terms:
    return Terms(m.scale_vector(), None, None, None)


# Module class (exactly: subclasses such as MTL-LoRA's compute something else) -> its terms.
TERMS: dict[type, Callable[..., Terms]] = {LoRA: _lora, DoRA: _dora, PeftLoRA: _peft, PeftDoRA: _peft_dora,
                                           VeRA: _vera, VeRADoRA: _dvora, IA3: _ia3}


def terms(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
          shared: tuple[torch.Tensor, ...]) -> Terms | str:
    """The module's routing terms at a projection with weight [out, in] and bias, or why it cannot be routed."""
    make = TERMS.get(type(module))
    if make is None:
        return f"{type(module).__name__} modules have no routed form"
    if getattr(module, "gated", False):
        return "a gated module's gate averages over the sequence, which stacked weights cannot express"
    if getattr(module, "chunks", ()):
        return "a fused q/k/v module is not routed"
    with torch.no_grad():
        return make(module, weight, bias, shared)


class RoutedLinear(nn.Module):
    """`forward(x, y, task_ids)` -> y' with y'[r] = g[k] ⊙ y[r] + B[k] (A[k] x[r]) + c[k], k = slot of task_ids[r]
    (see the module docstring). Stacks are buffers: [N+1, out] (g, c), [N+1, R, in] (A), [N+1, out, R] (B)."""

    def __init__(self, names: list[str], g: torch.Tensor | None, A: torch.Tensor | None, B: torch.Tensor | None,
                 c: torch.Tensor | None, where: str) -> None:
        super().__init__()
        self.names, self.where = names, where
        for key, value in (("g", g), ("A", A), ("B", B), ("c", c)):
            self.register_buffer(key, value)

    def forward(self, x: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        check_task_ids(task_ids, len(self.names), self.where)
        slot = route_index(task_ids, len(self.names))
        rows = y.shape[0]
        broadcast = (rows, *[1] * (y.dim() - 2), y.shape[-1])
        out = y
        if self.g is not None:
            out = out * self.g.index_select(0, slot).view(broadcast)
        if self.A is not None:
            flat = x.reshape(rows, -1, x.shape[-1])
            low = torch.bmm(flat, self.A.index_select(0, slot).transpose(1, 2))
            out = out + torch.bmm(low, self.B.index_select(0, slot).transpose(1, 2)).view(y.shape)
        if self.c is not None:
            out = out + self.c.index_select(0, slot).view(broadcast)
        return out


def route_linear(gm: fx.GraphModule, node: fx.Node, site: nn.Module) -> tuple[nn.Module, tuple] | str:
    """(RoutedLinear, its call's args) replacing one LoRASite call `node`, or why the site is left alone."""
    assert isinstance(site, LoRASite)
    children = routable_children(site.branches, site.multi_task)
    if isinstance(children, str):
        return children
    x, y, task_ids, *rest = node.args
    weight, bias = (rest.pop(0), rest.pop(0)) if site.needs_weight else (None, None)
    # "replace" modules (DoRA) need W (and PEFT DoRA b) as stored tensors
    W, b = stored_tensor(gm, weight), stored_tensor(gm, bias)
    if site.needs_weight and (W is None or (bias is not None and b is None)):
        return "the projection's weight or bias is not a stored tensor"
    shared: dict[str, tuple] = {}
    for name, count in site.shared_counts.items():
        values = tuple(stored_tensor(gm, n) for n in rest[:count])
        rest = rest[count:]
        if any(v is None for v in values):
            return f"adapter {name!r}'s shared tensors are not stored tensors"
        shared[name] = values
    found: dict[str, Terms] = {}
    for name in children:
        if name in site.adapters:
            made = terms(site.adapters[name], W, b, shared.get(name, ()))
            if isinstance(made, str):
                return f"adapter {name!r}: {made}"
            found[name] = made
    if not found:
        return "no child of the multi_task block acts at this projection"
    return RoutedLinear(children, *_stack(children, found), where=str(node.target)), (x, y, task_ids)


def _stack(children: list[str], found: dict[str, Terms]) -> tuple:
    """[N + 1, ...] stacks of g, A, B, c (slot N and absent children: the identity), ranks zero-padded."""
    some = next(iter(found.values()))
    out_features = (some.g if some.g is not None else some.B).shape[0]
    in_features = next((t.A.shape[1] for t in found.values() if t.A is not None), 0)
    dtype = next(t for t in some if t is not None).dtype
    rank = max((t.A.shape[0] for t in found.values() if t.A is not None), default=0)
    g = torch.ones(len(children) + 1, out_features, dtype=dtype)
    c = torch.zeros(len(children) + 1, out_features, dtype=dtype)
    A = torch.zeros(len(children) + 1, rank, in_features, dtype=dtype)
    B = torch.zeros(len(children) + 1, out_features, rank, dtype=dtype)
    for k, name in enumerate(children):
        t = found.get(name)
        if t is None:
            continue
        if t.g is not None:
            g[k] = t.g
        if t.c is not None:
            c[k] = t.c
        if t.A is not None:
            A[k, :t.A.shape[0]] = t.A
            B[k, :, :t.B.shape[1]] = t.B
    return (g if any(t.g is not None for t in found.values()) else None, A if rank else None,
            B if rank else None, c if any(t.c is not None for t in found.values()) else None)
