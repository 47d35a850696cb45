"""One residual site under a composition of bottleneck adapters (and AdapterFusion): the reference's
BottleneckLayer.bottleneck_layer_forward with its compose_* methods, on the state
(hidden, input_tensor, adapter_residual, up, last). Every adapter step is the adapter's own method
(module.py `Bottleneck.pre_forward` / `run` / `post_forward`, the code the single-adapter
emitter uses too), so PHM layers, gating, scaling and stochastic depth behave the same in every block:

    pre(a):    t, q, r = a.pre_forward(hidden, x, LN)      # e.g. t = LN(h + x), r = h  (seq_bn)
    single(a): hidden, up = a.run(t, r)                    # a's adapter; up feeds Fuse
    Stack:     pre(c); single(c) for each child c in turn
    Fuse:      q = query of pre_last; hidden = Fusion(q, [up_c]_c, r)
               (folded, fusion_fold.py: hidden = FoldedFusion(q, t, r), from h_c = act(down_c(t)))
    Split:     children on sequence slices, hidden = cat(dim=1)
    BatchSplit children on batch slices, cat(dim=0)
    Average:   hidden = mean_c(w_c · hidden_c)             # the reference's mean of weighted states
    end:       y = last.post_forward(hidden, h, x, LN)     # e.g. LN(hidden + x)

Children without a module at this site are skipped as in the reference; a site where no adapter of
the setup acts computes the model's own LN(h + x). Parallel is lowered before (branches: row block i
runs the setup with every Parallel block replaced by its child i). Compacter's shared PHM tensors
arrive as extra inputs, after the norm's weight and bias, in `shared_layout` order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx, nn
from torch.nn import functional as F

from ...compose.fusion_spec import FUSION_METHOD
from ...compose.task_inputs import check_task_ids, task_ids_node
from ...composition import Block, multi_task_children
from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import aten
from ...sites import SiteMap
from ..base import Placement, SiteModule, freeze
from .emit import reference_module
from .fusion import Fusion
from .fusion_fold import FoldedFusion, down_activation
from .module import Bottleneck

PASS = "lower_composition"

Tensors = dict[str, torch.Tensor]


class State(NamedTuple):
    hidden: torch.Tensor
    input_tensor: torch.Tensor
    residual: torch.Tensor
    up: torch.Tensor | None = None
    last: str | None = None
    ln: Callable[[torch.Tensor], torch.Tensor] | None = None  # the model's LayerNorm at this site, if any
    shared: dict[str, Tensors] | None = None  # per adapter: its shared PHM tensors by name


class BottleneckSite(nn.Module):
    """`forward(h, x, ln_weight, ln_bias, *shared)` -> the site's output; `adapters` / `adapter_fusion_layer`
    hold the modules under the reference's names."""

    def __init__(self, branches: list[Block | str], adapters: dict[str, Bottleneck], fusions: dict[str, Fusion],
                 norm: tuple[list[int], float] | None, multi_task: bool = False) -> None:
        super().__init__()
        self.branches = branches
        self.multi_task = multi_task  # the last input is then task_ids (a top-level multi_task block)
        self.adapters = nn.ModuleDict(adapters)
        self.adapter_fusion_layer = nn.ModuleDict(fusions)
        self.norm = norm
        # (adapter, tensor name) of each shared input, in the order the graph passes them.
        self.shared_layout = [(name, tensor) for name, m in adapters.items() for tensor in m.shared_names]

    def forward(self, h: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor | None = None,
                ln_bias: torch.Tensor | None = None, *shared: torch.Tensor) -> torch.Tensor:
        def ln(t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, self.norm[0], ln_weight, ln_bias, self.norm[1])

        task_ids = shared[-1] if self.multi_task else None
        shared = shared[:-1] if self.multi_task else shared
        tensors: dict[str, Tensors] = {}
        for (adapter, name), tensor in zip(self.shared_layout, shared, strict=True):
            tensors.setdefault(adapter, {})[name] = tensor
        layer_norm = ln if self.norm is not None else None
        if len(self.branches) == 1:
            return self._site(self.branches[0], h, x, layer_norm, tensors, task_ids)
        rows = h.shape[0] // len(self.branches)
        return torch.cat([self._site(b, h[i * rows:(i + 1) * rows], x[i * rows:(i + 1) * rows], layer_norm, tensors,
                                     task_ids[i * rows:(i + 1) * rows] if task_ids is not None else None)
                          for i, b in enumerate(self.branches)], dim=0)

    def with_fusions(self, replaced: dict[str, nn.Module]) -> BottleneckSite:
        """A new site sharing this one's adapters with some fusions replaced (passes/fold_fusion.py); this
        module, which an unoptimized graph may still call, stays as it was."""
        site = BottleneckSite(self.branches, dict(self.adapters), {**self.adapter_fusion_layer, **replaced},
                              self.norm, self.multi_task)
        return site.train(self.training)

    def _present(self, setup: Block | str) -> list[str]:
        names = setup.flatten() if isinstance(setup, Block) else [setup]
        return [n for n in names if n in self.adapters]

    def _site(self, setup, h, x, ln, shared, task_ids=None):
        if isinstance(setup, Block) and setup.kind == "multi_task":
            return self._multi_task_rows(setup, h, x, ln, shared, task_ids)
        if not self._present(setup):
            return ln(h + x) if ln is not None else h + x
        state = State(h, x, x, ln=ln, shared=shared)
        state = self._stack([setup], state) if isinstance(setup, str) else self._compose(setup, state)
        if state.last is None:
            return ln(h + x) if ln is not None else h + x
        return self.adapters[state.last].post_forward(state.hidden, h, state.input_tensor, ln)

    def _multi_task_rows(self, block: Block, h, x, ln, shared, task_ids):
        """Row r: this site with child task_ids[r] alone (each child runs on all rows, row r keeps its own: no
        data-dependent shapes); rows of id -1 or of a child absent here get the model's own output."""
        check_task_ids(task_ids, len(block.children), block.path or "multi_task")
        out = ln(h + x) if ln is not None else h + x
        for i, child in enumerate(block.children):
            if self._present(child):
                mask = (task_ids == i).view(-1, *[1] * (h.dim() - 1))
                out = torch.where(mask, self._site(child, h, x, ln, shared), out)
        return out

    def _pre_block(self, setup, state: State) -> State:
        # The reference uses the block's first adapter; fxadapt the first one present at this site.
        name = self._present(setup)[0]
        hidden, _, residual = self.adapters[name].pre_forward(state.hidden, state.input_tensor, state.ln)
        return state._replace(hidden=hidden, residual=residual)

    def _single(self, name: str, state: State) -> State:
        out, up = self.adapters[name].run(state.hidden, state.residual, state.shared.get(name, {}))
        return state._replace(hidden=out, up=up, last=name)

    def _child(self, child, state: State) -> State | None:
        if isinstance(child, Block):
            return self._compose(child, state)
        return self._single(child, state) if child in self.adapters else None

    def _compose(self, block: Block, state: State) -> State:
        return getattr(self, f"_{block.kind}")(block.children if block.kind == "stack" else block, state)

    def _stack(self, children, state: State) -> State:
        for child in children:
            if isinstance(child, Block):
                state = self._compose(child, state)
            elif child in self.adapters:
                state = self._single(child, self._pre_block(child, state))
        return state

    def _fuse(self, block: Block, state: State) -> State:
        fusion = self.adapter_fusion_layer[block.fusion_name]
        present = self._present(block)
        last = block.last() if block.last() in self.adapters else present[-1]
        hidden, query, residual = self.adapters[last].pre_forward(state.hidden, state.input_tensor, state.ln,
                                                                  fusion.config)
        state = state._replace(hidden=hidden, residual=residual)
        if isinstance(fusion, FoldedFusion):  # folded: only the fused adapters' rank-sized activations are needed
            downs = None if fusion.merges_down else [
                down_activation(self.adapters[n], hidden, state.shared.get(n, {})) for n in fusion.adapters]
            return state._replace(hidden=fusion(query, hidden, residual, downs), last=last)
        children = [s for s in (self._child(c, state) for c in block.children) if s is not None]
        if children:
            ups = torch.stack([s.up for s in children]).permute(1, 2, 0, 3)
            hidden = fusion(query, ups, state.residual)
        return state._replace(hidden=hidden, last=last)

    def _split(self, block: Block, state: State) -> State:
        state = self._pre_block(block, state)
        outs, last, start = [], None, 0
        for child, size in zip(block.children, block.splits, strict=True):
            part = slice(start, start + size)
            start += size
            sub = State(state.hidden[:, part], state.input_tensor[:, part], state.residual[:, part],
                        state.up[:, part] if state.up is not None else None, ln=state.ln, shared=state.shared)
            result = self._child(child, sub)
            if result is not None:
                outs.append(result.hidden)
                last = result.last or last
        return state._replace(hidden=torch.cat(outs, dim=1), last=last)

    def _batch_split(self, block: Block, state: State) -> State:
        state = self._pre_block(block, state)
        states, start = [], 0
        for child, size in zip(block.children, block.splits, strict=True):
            rows = slice(start, start + size)
            start += size
            sub = State(state.hidden[rows], state.input_tensor[rows], state.residual[rows],
                        state.up[rows] if state.up is not None else None, state.last, state.ln, state.shared)
            result = self._child(child, sub)
            states.append(result if result is not None else sub)
        up = torch.cat([s.up for s in states]) if all(s.up is not None for s in states) else None
        return State(torch.cat([s.hidden for s in states]), torch.cat([s.input_tensor for s in states]),
                     torch.cat([s.residual for s in states]), up, states[-1].last, state.ln, state.shared)

    def _average(self, block: Block, state: State) -> State:
        state = self._pre_block(block, state)
        pairs = [(self._child(c, state), w) for c, w in zip(block.children, block.weights, strict=True)]
        pairs = [(s, w) for s, w in pairs if s is not None]
        hidden = torch.mean(torch.stack([s.hidden * w for s, w in pairs], 0), dim=0)
        first = pairs[0][0]
        return State(hidden, first.input_tensor, first.residual, first.up, pairs[-1][0].last, state.ln, state.shared)


def lower_residual(gm: fx.GraphModule, spec, sites: SiteMap, paths: list, index: int,
                    modules: dict[str, SiteModule], shared: dict[str, tuple[fx.Node, ...]]
                    ) -> tuple[int, list[Placement]]:
    """`y = BottleneckSite(h, x, ln_w, ln_b)` at one residual site; returns (nodes made, placements)."""
    site = sites.residuals[index]
    fusions = {f.name: freeze(Fusion(f.config, site.hidden_size)) for f in spec.fusions
               if set(f.adapters) & set(modules)}
    norm = site.norm
    if norm is not None and norm.target != aten.layer_norm.default:
        raise UserError(f"composition at {site.role} of layer {site.layer}: the site's norm is "
                        f"{norm.target}, fxadapt composes bottleneck adapters only around layer_norm.")
    task_ids = _multi_task_input(gm, spec, paths, modules)
    module = BottleneckSite(paths, {n: m.module for n, m in modules.items()}, fusions,
                            (list(norm.args[1]), float(norm.args[4]) if len(norm.args) > 4 else 1e-5)
                            if norm is not None else None, task_ids is not None)
    path = add_module(gm, "composition", f"L{site.layer}_{site.role}", freeze(module))
    emit = Emitter(gm, site.output, {"adapter": ",".join(modules), "method": "composition", "pass": PASS,
                                     "site": site.role, "layer": site.layer})
    ln_args = (norm.args[2], norm.args[3]) if norm is not None else (None, None)
    uses = [a for n, m in modules.items() if m.module.shared_names for a in shared[n]]  # Compacter's PHM tensors
    out = emit.call_module(path, (site.hidden, site.residual, *ln_args, *uses,
                                  *([task_ids] if task_ids is not None else [])))
    emit.reroute(site.output, out)
    ref = reference_module(site)
    placements = [Placement(n, spec.adapters[n].method.NAME, site.role, site.layer, f"{path}.adapters.{n}",
                            m.reference_module, 0) for n, m in modules.items()]
    placements += [Placement(f, FUSION_METHOD, site.role, site.layer, f"{path}.adapter_fusion_layer.{f}",
                             ref.rpartition(".")[0] + ".adapter_fusion_layer", 0) for f in fusions]
    return len(emit.created), placements


def _multi_task_input(gm: fx.GraphModule, spec, paths: list, modules: dict[str, SiteModule]) -> fx.Node | None:
    """The task_ids node when the setup routes rows (a multi_task block at its top, or as a Parallel child);
    a multi_task block deeper in the setup, or an invertible adapter in it, cannot be lowered here."""
    if not multi_task_children(spec.setup):
        return None
    for path in paths:
        if isinstance(path, Block) and path.kind != "multi_task" and multi_task_children(path):
            raise UserError(f"{spec.setup.path}: bottleneck adapters route rows only in a multi_task block at the "
                            "top of the setup (or a Parallel child); put the multi_task block outermost.")
    inverted = [n for n in modules if getattr(spec.adapters[n].config, "inv_adapter", None)]
    if inverted:
        raise UserError(f"{spec.adapters[inverted[0]].path}: an invertible adapter runs once after the embeddings "
                        "for every row, so it cannot be routed per row in a multi_task block; use its config "
                        "without inv_adapter.")
    return task_ids_node(gm)
