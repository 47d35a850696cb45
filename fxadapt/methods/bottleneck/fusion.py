"""AdapterFusion (Pfeiffer et al., 2021) as the reference's BertFusion (temperature T = 1):

    U = [up_1, ..., up_n]                       # the fused adapters' scaled up-projections, [B, S, n, H]
    K = key(U + r?)  V = value(U + r?)          # r: the adapter residual when residual_before
    a = softmax(dropout(query(q) · K^T) / T)    # over the n adapters, per token; T = 1; dropout in training
    out = a · V (value after the softmax when not value_before_softmax) (+ r unless residual_before)

Attribute names (`query`, `key`, `value`, `dense`) mirror the reference so checkpoint keys map 1:1.
`bert_init` initialises the projections as the reference does (normal(0, 0.02), zero bias, drawn in its
order); the compile path loads or keeps nn.Linear's default. `dropout` is the reference's dropout on the
attention scores (the model's attention-probability dropout), active only in training mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class Fusion(nn.Module):
    def __init__(self, config: dict[str, Any], hidden: int, dropout: float = 0.0, bert_init: bool = False) -> None:
        super().__init__()
        self.config = dict(config)
        self.dropout_p = float(dropout)
        if not (config["query"] or config["key"] or config["value"]):
            self.dense = nn.Linear(hidden, 1)  # created (and saved) by the reference, unused in its forward
        if config["query"]:
            self.query = _linear(hidden, True, bert_init)
        if config["key"]:
            self.key = _linear(hidden, True, bert_init)
        if config["value"]:
            self.value = _linear(hidden, False, bert_init)
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
        if self.dropout_p > 0 and self.training:
            scores = F.dropout(scores, self.dropout_p, True)
        probs = torch.softmax(scores, dim=-1)
        context = torch.squeeze(torch.matmul(probs.unsqueeze(2), value_layer), dim=2)
        if config["value"] and not config["value_before_softmax"]:
            context = self.value(context)
        if not config["residual_before"]:
            context = context + residual
        return context


def _linear(hidden: int, bias: bool, bert_init: bool) -> nn.Linear:
    linear = nn.Linear(hidden, hidden, bias=bias)
    if bert_init:  # the reference's Adapter.init_bert_weights, applied right after creation
        with torch.no_grad():
            linear.weight.normal_(0.0, 0.02)
            if linear.bias is not None:
                linear.bias.zero_()
    return linear
