"""AdapterFusion (Pfeiffer et al., 2021) as the reference's BertFusion, in eval mode:

    U = [up_1, ..., up_n]                       # the fused adapters' scaled up-projections, [B, S, n, H]
    K = key(U + r?)  V = value(U + r?)          # r: the adapter residual when residual_before
    a = softmax(query(q) · K^T / T)             # over the n adapters, per token; T = 1
    out = a · V (value after the softmax when not value_before_softmax) (+ r unless residual_before)

Attribute names (`query`, `key`, `value`, `dense`) mirror the reference so checkpoint keys map 1:1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Fusion(nn.Module):
    def __init__(self, config: dict[str, Any], hidden: int) -> None:
        super().__init__()
        self.config = dict(config)
        if not (config["query"] or config["key"] or config["value"]):
            self.dense = nn.Linear(hidden, 1)  # created (and saved) by the reference, unused in its forward
        if config["query"]:
            self.query = nn.Linear(hidden, hidden)
        if config["key"]:
            self.key = nn.Linear(hidden, hidden)
        if config["value"]:
            self.value = nn.Linear(hidden, hidden, bias=False)
            if config["value_initialized"]:
                with torch.no_grad():
                    self.value.weight.fill_(1e-6).fill_diagonal_(1.0)

    def forward(self, query: torch.Tensor, up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        config = self.config
        value = up
        if config["residual_before"]:
            # The reference adds in place to a tensor that is also its key: both see the residual.
            value = value + residual[:, :, None, :]
        key = value
        query_layer = self.query(query) if config["query"] else query
        key_layer = self.key(key) if config["key"] else key
        value_layer = self.value(value) if config["value"] and config["value_before_softmax"] else value
        scores = torch.squeeze(torch.matmul(query_layer.unsqueeze(2), key_layer.transpose(-2, -1)), dim=2)
        probs = torch.softmax(scores, dim=-1)
        context = torch.squeeze(torch.matmul(probs.unsqueeze(2), value_layer), dim=2)
        if config["value"] and not config["value_before_softmax"]:
            context = self.value(context)
        if not config["residual_before"]:
            context = context + residual
        return context
