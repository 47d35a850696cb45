"""The adapters' activation functions by name (the reference's Activation_Function_Class), shared by the
bottleneck family, invertible adapters, prefix tuning and ReFT."""

from __future__ import annotations

from torch import nn

from ..errors import UserError


def make_activation(name: str, path: str) -> nn.Module:
    """The reference's Activation_Function_Class: transformers' ACT2FN by lower-case name."""
    from transformers.activations import ACT2FN  # heavy: imported only when an adapter is built

    key = name.lower()
    if key == "leakyrelu":
        return nn.LeakyReLU()
    if key not in ACT2FN:
        raise UserError(f"{path}: unknown non_linearity {name!r}; choose one of: "
                        f"{', '.join(sorted(ACT2FN))}, leakyrelu.")
    return ACT2FN[key]
