"""MultiTask's extra model input: the model is wrapped so that its captured graph takes a per-row
`task_ids` tensor (row r is routed to the multi_task block's child task_ids[r]) beside its own inputs.

The ids' meaning, shared by every composed and routed site (docs/composition.md, "Routing rows"):
0 .. N-1 pick a child; -1 means "no adapter" (the row gets the base model's output there); anything else
is a UserError when the graph runs eagerly (`check_task_ids`) and is treated as -1 inside an exported
graph, where a data-dependent check cannot run (`route_index`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..capture import dynamic_shapes_for, input_names_for, load_model, make_inputs, sequence_bound
from ..composition import Block
from ..errors import UserError

NO_ADAPTER = -1  # a task id that routes its row to the base model (PEFT's "__base__")


class TaskIdsModel(nn.Module):
    """`forward(**inputs, task_ids)`: the wrapped model's forward; task_ids is read by the composed sites.
    Its module paths gain the prefix `model.`, which checkpoint keys drop as a base-model prefix."""

    base_model_prefix = "model"

    def __init__(self, model: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: torch.Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def with_task_ids(model: nn.Module | str, example_inputs: dict | None, task: str | None, tasks: int
                  ) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, dict[int, Any]]]:
    """(wrapped model, example inputs with task_ids, dynamic dims): batch and sequence stay dynamic (the
    sequence is bounded by the model's positions), so one exported graph runs at any sequence length."""
    if isinstance(model, str):
        model = load_model(model, task)
    names = input_names_for(model)
    if names != ["input_ids", "attention_mask"]:
        raise UserError(f"$.active: multi_task needs a text model with input_ids and attention_mask; this model "
                        f"takes {names}.")
    config = getattr(model, "config", None)
    if example_inputs is None:
        example_inputs = make_inputs(names, config, 2, 8)
    if "task_ids" not in example_inputs:
        batch = next(iter(example_inputs.values())).shape[0]
        example_inputs = dict(example_inputs, task_ids=torch.arange(batch) % tasks)
    shapes = dynamic_shapes_for(names, config, sequence_bound(model, config))
    if example_inputs["input_ids"].shape[1] < 2:  # torch.export specializes a size-1 dim: keep it static
        for dims in shapes.values():
            dims.pop(1, None)
    shapes["task_ids"] = {0: shapes["input_ids"][0]}
    return TaskIdsModel(model, names), example_inputs, shapes


def check_task_ids(task_ids: torch.Tensor, count: int, where: str) -> None:
    """UserError for an id outside [-1, count) when the graph runs eagerly; nothing while torch.export (or
    torch.compile) traces, where the ids have no values (the exported graph treats such ids as -1)."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return
    bad = (task_ids < NO_ADAPTER) | (task_ids >= count)
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()[:5]
        raise UserError(f"{where}: task_ids {task_ids[bad].tolist()[:5]} (rows {rows}) are out of range; this "
                        f"multi_task block routes to {count} children, so each id must be in 0..{count - 1}, or "
                        f"{NO_ADAPTER} for the base model without adapters.")


def route_index(task_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's slot in stacked weights of `count` children plus one "no adapter" slot at index `count`:
    -1 and (in an exported graph) out-of-range ids go to that slot."""
    valid = (task_ids >= 0) & (task_ids < count)
    return torch.where(valid, task_ids, torch.full_like(task_ids, count)).long()


def task_ids_node(gm: fx.GraphModule) -> fx.Node:
    """The graph's `task_ids` placeholder (a multi_task block routes rows by it)."""
    node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "task_ids"), None)
    if node is None:
        raise UserError("$.active: a multi_task block needs a per-row \"task_ids\" model input; compile with "
                        "task_ids among the inputs.")
    return node


def routable_children(branches: list, multi_task: bool) -> list[str] | str:
    """The children of a composed site's multi_task block when the site is that one block of single adapters
    (what route_rows stacks), else why the site is left alone."""
    if not multi_task or len(branches) != 1:
        return "not a lone multi_task block (a Parallel replicates its rows)"
    block = branches[0]
    if not isinstance(block, Block) or block.kind != "multi_task":
        return "the multi_task block is nested in another block"
    if not all(isinstance(c, str) for c in block.children):
        return "a child of the multi_task block is a block, not a single adapter"
    return list(block.children)
