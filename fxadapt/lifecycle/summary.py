"""adapter_summary(): one row per adapter (and head) with its size relative to the base model.

    %Param = 100 · parameters of the adapter / parameters of the base model

The layout follows the reference's `adapter_summary()`; `as_dict=True` returns the rows instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def count(modules: list[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for module in modules:
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total


def trainable(modules: list[nn.Module]) -> bool:
    params = [p for m in modules for p in m.parameters()]
    return bool(params) and all(p.requires_grad for p in params)


def rows(entries: dict[str, tuple[str, list[nn.Module]]], active: list[str], base_params: int,
         base_trainable: bool) -> list[dict[str, Any]]:
    table = []
    for name, (method, modules) in entries.items():
        params = count(modules)
        table.append({"name": name, "architecture": method, "#param": params,
                      "%param": 100.0 * params / base_params if base_params else 0.0,
                      "active": name in active, "train": trainable(modules)})
    table.append({"name": "Full model", "architecture": "", "#param": base_params, "%param": 100.0,
                  "active": None, "train": base_trainable})
    return table


def render(table: list[dict[str, Any]]) -> str:
    width = 80
    lines = ["=" * width, f"{'Name':<25}{'Architecture':<20}{'#Param':>12}{'%Param':>10}{'Active':>7}{'Train':>6}",
             "-" * width]
    for row in table:
        if row["name"] == "Full model":
            lines.append("-" * width)
        active = "" if row["active"] is None else str(int(row["active"]))
        lines.append(f"{row['name']:<25}{row['architecture']:<20}{row['#param']:>12,}{row['%param']:>10.3f}"
                     f"{active:>7}{int(row['train']):>6}")
    lines.append("=" * width)
    return "\n".join(lines)
