"""One projection y = W x + b under a composition of LoRA adapters: the reference's LoRALinear.compose on
the state (layer_input x, hidden d or None, layer_output y, last):

    single(a): d = s_a · B_a A_a (d if d is not None else x)    # Stack chains: the next LoRA reads d
    Stack:     single(c) for each child c in turn
    BatchSplit children on batch slices, d = cat(dim=0)
    Average:   d = mean_c(w_c · d_c)                            # the reference's mean of weighted states
    MultiTask: row r takes child task_ids[r]                    # selected per row (see docs/composition.md)
    end:       y' = y + d

A gated LoRA scales by g = mean_seq(sigmoid(G x)) instead of s. An MTL-LoRA child gives its own update,
s · Σ_i c_i B_i M A d (methods/mtl_lora.py), in place of s · B A d. A child without a LoRA here contributes
no update (d = 0 on its rows). Parallel is lowered before, as row blocks (bottleneck_site.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from ..composition import Block
from ..methods.lora import LoRA
from ..methods.mtl_lora import MTLLoRA


class State(NamedTuple):
    layer_input: torch.Tensor
    hidden: torch.Tensor | None
    layer_output: torch.Tensor
    last: str | None = None
    task_ids: torch.Tensor | None = None  # MultiTask's per-row child index


def lora_delta(m: LoRA | MTLLoRA, hidden: torch.Tensor | None, layer_input: torch.Tensor) -> torch.Tensor:
    """The reference LoRA.forward(hidden_states, layer_input): its update, scaled or gated."""
    inp = hidden if hidden is not None else layer_input
    if isinstance(m, MTLLoRA):
        return m.delta(inp, layer_input)
    out = F.linear(F.linear(m.lora_dropout(inp), m.lora_A), m.lora_B)
    if m.gated:
        return out * torch.mean(torch.sigmoid(m.gate(layer_input)), dim=1).unsqueeze(-1)
    return out * m.scaling


class LoRASite(nn.Module):
    """`forward(x, y[, task_ids])` -> y'; `adapters` holds the LoRA modules under their adapter names."""

    def __init__(self, branches: list[Block | str], adapters: dict[str, LoRA | MTLLoRA]) -> None:
        super().__init__()
        self.branches = branches
        self.adapters = nn.ModuleDict(adapters)

    def forward(self, x: torch.Tensor, y: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.branches) == 1:
            return self._site(self.branches[0], x, y, task_ids)
        rows = x.shape[0] // len(self.branches)
        return torch.cat([self._site(b, x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows],
                                     task_ids[i * rows:(i + 1) * rows] if task_ids is not None else None)
                          for i, b in enumerate(self.branches)], dim=0)

    def _site(self, setup, x, y, task_ids):
        state = State(x, None, y, None, task_ids)
        state = self._stack([setup], state) if isinstance(setup, str) else self._compose(setup, state)
        return y if state.hidden is None else y + state.hidden

    def _child(self, child, state: State) -> State | None:
        if isinstance(child, Block):
            return self._compose(child, state)
        if child in self.adapters:
            return state._replace(hidden=lora_delta(self.adapters[child], state.hidden, state.layer_input),
                                  last=child)
        return None

    def _compose(self, block: Block, state: State) -> State:
        return getattr(self, f"_{block.kind}")(block.children if block.kind == "stack" else block, state)

    def _stack(self, children, state: State) -> State:
        for child in children:
            state = self._child(child, state) or state
        return state

    def _filled(self, state: State) -> torch.Tensor:
        """The update of a state, zero where no LoRA acted (so rows of absent children keep y)."""
        return state.hidden if state.hidden is not None else torch.zeros_like(state.layer_output)

    def _batch_split(self, block: Block, state: State) -> State:
        states, start = [], 0
        for child, size in zip(block.children, block.splits, strict=True):
            rows = slice(start, start + size)
            start += size
            sub = State(state.layer_input[rows], state.hidden[rows] if state.hidden is not None else None,
                        state.layer_output[rows], state.last,
                        state.task_ids[rows] if state.task_ids is not None else None)
            states.append(self._child(child, sub) or sub)
        if all(s.hidden is None for s in states):
            return state
        return state._replace(hidden=torch.cat([self._filled(s) for s in states]), last=states[-1].last)

    def _average(self, block: Block, state: State) -> State:
        pairs = [(self._child(c, state), w) for c, w in zip(block.children, block.weights, strict=True)]
        pairs = [(s, w) for s, w in pairs if s is not None]
        if not pairs:
            return state
        hidden = torch.mean(torch.stack([self._filled(s) * w for s, w in pairs], 0), dim=0)
        return state._replace(hidden=hidden, last=pairs[-1][0].last)

    def _multi_task(self, block: Block, state: State) -> State:
        # Rows are independent, so each child runs on all rows and row r keeps child task_ids[r]'s result:
        # the reference's sort / BatchSplit / unsort without data-dependent shapes.
        task_ids = state.task_ids
        hidden, last = None, state.last
        for i, child in enumerate(block.children):
            result = self._child(child, state)
            if result is None:
                continue
            mask = (task_ids == i).view(-1, *[1] * (state.layer_output.dim() - 1))
            update = self._filled(result)
            hidden = torch.where(mask, update, hidden if hidden is not None else torch.zeros_like(update))
            last = result.last
        return state if hidden is None else state._replace(hidden=hidden, last=last)
