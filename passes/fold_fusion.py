"""Optimization pass: fold each AdapterFusion of a composed bottleneck site into its adapters' up-projections.

    U_i = A_i h_i + β_i                      (adapter i's scaled up-projection of its rank-r_i activation h_i)
    a   = softmax_i((W_k^T (W_q q + b_q)) · U_i)          (q·b_k and, with residual_before, q·W_k r cancel)
    out = Σ_i a_i (W_v A_i h_i + W_v β_i) + (W_v r if residual_before else r)     (Σ_i a_i = 1)

  ==>  z = [G; c] q + [g; d],  G_i = A_i^T W_k^T W_q,  c_i = W_q^T W_k β_i,  g_i = A_i^T W_k^T b_q,  d_i = β_i·W_k^T b_q
       score_i = h_i·z_{G_i} + z_{c_i};   out = [W_v A_i | W_v β_i] [a_i h_i | a_i] (+ W_v r or r)

(query / key / value off: that projection is the identity; fxadapt/methods/bottleneck/fusion_fold.py has the
module and the derivation). Per token the fusion then costs (Σr + N)·H twice instead of (1 + 2N)·H² (one H²
product stays for W_v r under residual_before with a value projection).

Each `BottleneckSite` (methods/bottleneck/site.py) holding folded fusions is replaced by a new one, under the
same path, sharing the adapters: the call node, its metadata and every other parameter name stay as they were,
and the unfolded module is not touched. A fusion is left unfolded, with the reason in
`gm.meta["fxadapt"]["not_folded"]` (report.json "not_folded"), when the site is in training mode (dropout on
the scores, stochastic depth on U_i, gradients to the fusion's weights), its config asks for a temperature
(the reference anneals T on every call; fxadapt's specs refuse it, so this guards hand-built modules), a Fuse
child is a block (its U comes from a stacked state, not one adapter's h), or an adapter's up-projection is
not a linear layer (nn.Linear, or Compacter's PHM layer, whose weight is materialized). count = fusions folded.
"""

from __future__ import annotations

import torch
from torch import fx

from fxadapt import meta
from fxadapt.compose.fusion_spec import FUSION_METHOD
from fxadapt.composition import Block
from fxadapt.methods.bottleneck.fusion import Fusion
from fxadapt.methods.bottleneck.fusion_fold import Affine, affine_up, fold
from fxadapt.methods.bottleneck.site import BottleneckSite

from .manager import PassResult

PASS = "fold_fusion"
SHARED_ARGS = 4  # BottleneckSite(h, x, ln_weight, ln_bias, *shared)


def fold_fusion(gm: fx.GraphModule) -> PassResult:
    folded = 0
    refused: list[dict] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        site = gm.get_submodule(node.target)
        if not isinstance(site, BottleneckSite):
            continue
        replaced = {}
        for name, fusion in site.adapter_fusion_layer.items():
            if not isinstance(fusion, Fusion):
                continue  # folded already
            result = _fold(gm, node, site, name, fusion)
            if isinstance(result, str):
                refused.append({"module": f"{node.target}.adapter_fusion_layer.{name}", "fusion": name,
                                "reason": result})
            elif result is not None:
                replaced[name] = result
        if replaced:
            owner, _, leaf = node.target.rpartition(".")
            setattr(gm.get_submodule(owner), leaf, site.with_fusions(replaced))
            node.meta.setdefault(meta.MERGED, []).extend(
                {"adapter": name, "method": FUSION_METHOD, "pass": PASS} for name in replaced)
            folded += len(replaced)
    if refused:
        gm.meta.setdefault("fxadapt", {}).setdefault("not_folded", []).extend(refused)
    return PassResult(gm, folded)


def _fold(gm: fx.GraphModule, node: fx.Node, site: BottleneckSite, name: str, fusion: Fusion):
    """The folded module, None when no Fuse block calls this fusion here, or why it cannot fold (a str)."""
    if any(m.training for m in site.modules()):
        return ("training mode: dropout on the attention scores and stochastic depth on the adapters' outputs act, "
                "and the fusion's own weights are being trained")
    if fusion.config.get("temperature"):
        return "temperature: the reference anneals the softmax temperature on every forward call"
    blocks = [b for setup in site.branches for b in _fuse_blocks(setup) if b.fusion_name == name]
    if not blocks:
        return None
    nested = next((c for b in blocks for c in b.children if isinstance(c, Block)), None)
    if nested is not None:
        return (f"a Fuse child is a {nested.kind} block: its up-projection is computed from a stacked state, "
                "not from one adapter's bottleneck activation")
    present = {tuple(c for c in b.children if c in site.adapters) for b in blocks}
    if len(present) != 1:
        return "Fuse blocks at this site attend over different adapters"
    adapters = list(present.pop())
    if not adapters:
        return None  # none of its adapters acts at this site: the fusion is never called here
    shared = _shared(gm, node, site)
    if isinstance(shared, str):
        return shared
    hidden = node.args[0].meta["val"].shape[-1] if "val" in node.args[0].meta else None
    if hidden is None:
        return "the site's hidden size is unknown (no shape metadata on its input)"
    ups: list[Affine] = []
    for adapter in adapters:
        up = affine_up(site.adapters[adapter], hidden, shared.get(adapter, {}))
        if isinstance(up, str):
            return f"adapter {adapter!r}: {up}"
        ups.append(up)
    dtype = next((p.dtype for p in site.adapters[adapters[0]].parameters()), torch.get_default_dtype())
    return fold(fusion, adapters, ups, dtype, [site.adapters[a] for a in adapters]).train(False)


def _fuse_blocks(setup: Block | str) -> list[Block]:
    if not isinstance(setup, Block):
        return []
    found = [setup] if setup.kind == "fuse" else []
    return found + [b for child in setup.children for b in _fuse_blocks(child)]


def _shared(gm: fx.GraphModule, node: fx.Node, site: BottleneckSite) -> dict[str, dict[str, torch.Tensor]] | str:
    """Compacter's shared PHM tensors at this call, by adapter and name (get_attr constants)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for (adapter, tensor), arg in zip(site.shared_layout, node.args[SHARED_ARGS:], strict=True):
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return f"adapter {adapter!r}: its shared tensor {tensor!r} is not a constant of the graph"
        tensors.setdefault(adapter, {})[tensor] = _attr(gm, arg.target)
    return tensors


def _attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value
