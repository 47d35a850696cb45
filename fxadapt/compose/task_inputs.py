"""MultiTask's extra model input: the model is wrapped so that its captured graph takes a per-row
`task_ids` tensor (row r is routed to the multi_task block's child task_ids[r]) beside its own inputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..capture import input_names_for, load_model, make_inputs
from ..errors import UserError


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


def with_task_ids(model: nn.Module | str, example_inputs: dict | None, task: str | None,
                  tasks: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    if isinstance(model, str):
        model = load_model(model, task)
    names = input_names_for(model)
    if names != ["input_ids", "attention_mask"]:
        raise UserError(f"$.active: multi_task needs a text model with input_ids and attention_mask; this model "
                        f"takes {names}.")
    if example_inputs is None:
        example_inputs = make_inputs(names, getattr(model, "config", None), 2, 8)
    if "task_ids" not in example_inputs:
        batch = next(iter(example_inputs.values())).shape[0]
        example_inputs = dict(example_inputs, task_ids=torch.arange(batch) % tasks)
    return TaskIdsModel(model, names), example_inputs
