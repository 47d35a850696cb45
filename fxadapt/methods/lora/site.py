"""One projection y = W x + b under a composition of LoRA-family adapters: the reference's LoRALinear.compose
on the state (layer_input x, hidden d or None, layer_output y, last). Every adapter module answers for itself
(family.py): `update(d, x)` is the reference's module forward, `combine(y, d, W, b)` its
`last.com(y, d, scaling=1)` (DoRA: its magnitude formula):

    single(a): d = a.update(d, x)         # LoRA s·B A (d or x), IA3 d ⊙ α·l, VeRA, DoRA, MTL-LoRA, PEFT
    Stack:     single(c) for each child c in turn (the next adapter reads d)
    BatchSplit children on batch slices, d = cat(dim=0)
    Average:   d = mean_c(w_c · d_c)      # the reference's mean of weighted states
    MultiTask: row r takes child task_ids[r]
    end:       y' = last.combine(y, d)

`last` is the last adapter that acted; after BatchSplit / MultiTask it is per row (each row ends with the
adapter that produced its d), which is the reference's result whenever the children combine alike (all
additive, or all IA3) and fxadapt's defined semantics otherwise (docs/composition.md). A row no adapter
acted on keeps y. Parallel is lowered before, as row blocks (`branches`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ...compose.task_inputs import check_task_ids
from ...composition import Block
from ...errors import UserError
from .family import FamilyModule


class State(NamedTuple):
    layer_input: torch.Tensor
    hidden: torch.Tensor | None
    layer_output: torch.Tensor
    last: str | torch.Tensor | None = None  # a name, or per row an index into LoRASite.names (-1: none)
    task_ids: torch.Tensor | None = None  # MultiTask's per-row child index
    shared: dict | None = None  # adapter name -> its shared tensors (VeRA's A and B)


class LoRASite(nn.Module):
    """`forward(x, y, *inputs)` -> y'; `adapters` holds the family modules under their adapter names.

    `inputs` are, in order: task_ids (with `multi_task`), the projection's weight and bias (when a module
    combines by "replace", e.g. DoRA), then each adapter's `shared` tensors (VeRA's A and B)."""

    def __init__(self, branches: list[Block | str], adapters: dict[str, FamilyModule], multi_task: bool = False,
                 shared: dict[str, int] | None = None) -> None:
        super().__init__()
        self.branches = branches
        self.adapters = nn.ModuleDict(adapters)
        self.names = list(adapters)
        self.multi_task = multi_task
        self.needs_weight = any(m.composition == "replace" for m in adapters.values())
        self.shared_counts = dict(shared or {})
        self._all_add = all(m.composition == "add" for m in adapters.values())
        for branch in branches:
            if isinstance(branch, Block):
                self._check_average(branch)

    def _check_average(self, block: Block) -> None:
        """The reference cannot average an IA3 factor with additive updates (its states differ in shape)."""
        for child in block.children:
            if isinstance(child, Block):
                self._check_average(child)
        if block.kind != "average":
            return
        kinds = {self.adapters[n].composition == "scale" for c in block.children
                 for n in ([c] if isinstance(c, str) else c.flatten()) if n in self.adapters}
        if len(kinds) > 1:
            raise UserError(f"{block.path}: an average block cannot mix (IA)^3 adapters (composition_mode \"scale\", "
                            "a factor) with additive LoRA-family adapters at the same projection; the reference "
                            "fails on it too. Average adapters of one kind.")

    def forward(self, x: torch.Tensor, y: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
        rest = list(inputs)
        task_ids = rest.pop(0) if self.multi_task else None
        weight, bias = (rest.pop(0), rest.pop(0)) if self.needs_weight else (None, None)
        shared: dict[str, tuple] = {}
        for name, count in self.shared_counts.items():
            shared[name], rest = tuple(rest[:count]), rest[count:]
        if len(self.branches) == 1:
            return self._site(self.branches[0], x, y, task_ids, weight, bias, shared)
        rows = x.shape[0] // len(self.branches)
        return torch.cat([self._site(b, x[i * rows:(i + 1) * rows], y[i * rows:(i + 1) * rows],
                                     task_ids[i * rows:(i + 1) * rows] if task_ids is not None else None,
                                     weight, bias, shared)
                          for i, b in enumerate(self.branches)], dim=0)

    def _site(self, setup, x, y, task_ids, weight, bias, shared):
        state = State(x, None, y, None, task_ids, shared)
        state = self._stack([setup], state) if isinstance(setup, str) else self._compose(setup, state)
        if state.hidden is None:
            return y
        if isinstance(state.last, str):
            return self.adapters[state.last].combine(y, state.hidden, weight, bias, shared.get(state.last, ()))
        if self._all_add:  # every adapter adds; rows no adapter acted on hold d = 0
            return y + state.hidden
        out = y
        for k, name in enumerate(self.names):
            mask = (state.last == k).view(-1, *[1] * (y.dim() - 1))
            out = torch.where(mask, self.adapters[name].combine(y, state.hidden, weight, bias,
                                                                shared.get(name, ())), out)
        return out

    def _child(self, child, state: State) -> State | None:
        if isinstance(child, Block):
            return self._compose(child, state)
        if child in self.adapters:
            module = self.adapters[child]
            hidden = module.update(state.hidden, state.layer_input, state.shared.get(child, ()))
            if module.composition == "scale":  # IA3's factor is [out] or [batch, 1, out]: give it y's shape
                hidden = hidden.expand_as(state.layer_output)
            return state._replace(hidden=hidden, last=child)
        return None

    def _compose(self, block: Block, state: State) -> State:
        return getattr(self, f"_{block.kind}")(block.children if block.kind == "stack" else block, state)

    def _stack(self, children, state: State) -> State:
        for child in children:
            state = self._child(child, state) or state
        return state

    def _filled(self, state: State) -> torch.Tensor:
        """The update of a state, zero where no adapter acted (those rows keep y: their `last` is -1)."""
        return state.hidden if state.hidden is not None else torch.zeros_like(state.layer_output)

    def _row_last(self, state: State, rows: int) -> torch.Tensor:
        """`state.last` per row, as indices into `names` (-1 where no adapter acted)."""
        if isinstance(state.last, torch.Tensor):
            return state.last
        index = -1 if state.last is None or state.hidden is None else self.names.index(state.last)
        return torch.full((rows,), index, dtype=torch.long, device=state.layer_output.device)

    def _batch_split(self, block: Block, state: State) -> State:
        states, start = [], 0
        for child, size in zip(block.children, block.splits, strict=True):
            rows = slice(start, start + size)
            start += size
            sub = State(state.layer_input[rows], state.hidden[rows] if state.hidden is not None else None,
                        state.layer_output[rows], state.last[rows] if isinstance(state.last, torch.Tensor)
                        else state.last, state.task_ids[rows] if state.task_ids is not None else None,
                        state.shared)
            states.append(self._child(child, sub) or sub)
        if all(s.hidden is None for s in states):
            return state
        lasts = [s.last for s in states]
        if all(isinstance(v, str) for v in lasts) and len(set(lasts)) == 1:
            last: str | torch.Tensor = lasts[0]
        else:
            last = torch.cat([self._row_last(s, s.layer_output.shape[0]) for s in states])
        return state._replace(hidden=torch.cat([self._filled(s) for s in states]), last=last)

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
        # Rows of a child absent here keep the state they came with, as in the reference's BatchSplit.
        task_ids, rows = state.task_ids, state.task_ids.shape[0]
        check_task_ids(task_ids, len(block.children), block.path or "multi_task")  # -1: no adapter, as routed
        results = [(i, self._child(child, state)) for i, child in enumerate(block.children)]
        results = [(i, r) for i, r in results if r is not None]
        if not results:
            return state
        hidden, last = self._filled(state), self._row_last(state, rows)
        for i, result in results:
            mask = task_ids == i
            hidden = torch.where(mask.view(-1, *[1] * (hidden.dim() - 1)), self._filled(result), hidden)
            last = torch.where(mask, self._row_last(result, rows), last)
        return state._replace(hidden=hidden, last=last)
