"""Compacter's parameterized hypercomplex multiplication (PHM) layers, as in `adapters` 1.3.0.

A PHM layer replaces a bottleneck projection x -> x W + b (W: [in, out]) by

    H = sum_i  C_i ⊗ W_i          (Kronecker product; C: [n, n, n] "phm rule", W_i: [in/n, out/n])
    y = x H + b

with n = phm_dim. Compacter factorizes W_i = W_left_i @ W_right_i (rank `phm_rank`), and the rule
C (or C = C_left @ C_right when `factorized_phm_rule`) is shared by every PHM layer of the adapter.
Shared tensors live outside the per-layer modules, like the reference's
`base_model.shared_parameters[NAME]` (checkpoint keys `shared_parameters.NAME.phm_rule`): here in one
`SharedPHM` module whose tensors reach each adapter through `get_attr` nodes in the graph.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import UserError

RULE_INITS = ("normal", "uniform")
W_INITS = ("phm", "glorot-normal", "glorot-uniform", "normal")


def kronecker_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product over the last two dims; the reference's op sequence (same rounding)."""
    res = a.unsqueeze(-1).unsqueeze(-3) * b.unsqueeze(-2).unsqueeze(-4)
    return res.reshape(res.shape[:-4] + (a.shape[-2] * b.shape[-2], a.shape[-1] * b.shape[-1]))


def _init_w(config, *tensors: torch.Tensor) -> None:
    # The reference's init_W tests `if hypercomplex_nonlinearity:` first, so every non-empty choice
    # ends up as Glorot-normal; kept, since a fresh adapter should start where the reference starts.
    with torch.no_grad():
        for tensor in tensors:
            for i in range(tensor.shape[0]):
                nn.init.xavier_normal_(tensor[i])


def _init_rule(config, *tensors: torch.Tensor, shared: bool) -> None:
    with torch.no_grad():
        for tensor in tensors:
            if config.phm_c_init == "uniform":
                # Shared rules are drawn from U(-1, 1), per-layer rules from U(-0.01, 0.01) (reference).
                tensor.uniform_(-1.0, 1.0) if shared else tensor.uniform_(-0.01, 0.01)
            else:
                tensor.normal_(0.0, config.phm_init_range if shared else 0.01)


def _add_rule(module: nn.Module, config, shared: bool) -> None:
    """The PHM rule C [n, n, n] (or its factors C_left [n, n, 1], C_right [n, 1, n]) as parameters of `module`,
    initialised as the reference does (SharedPHM holds the shared one, a PHMLayer its own)."""
    n = config.phm_dim
    learn = bool(config.learn_phm)
    if config.factorized_phm_rule:
        module.phm_rule_left = nn.Parameter(torch.empty(n, n, 1), requires_grad=learn)
        module.phm_rule_right = nn.Parameter(torch.empty(n, 1, n), requires_grad=learn)
        _init_rule(config, module.phm_rule_left, module.phm_rule_right, shared=shared)
    else:
        module.phm_rule = nn.Parameter(torch.empty(n, n, n), requires_grad=learn)
        _init_rule(config, module.phm_rule, shared=shared)


def validate(config, path: str) -> None:
    """PHM options that do not depend on the model (sizes are checked in `check_sizes`)."""
    for key in ("phm_dim", "phm_rank"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise config.fail(path, key, f"must be a positive integer, got {value!r}.")
    if config.phm_c_init not in RULE_INITS:
        raise config.fail(path, "phm_c_init", f"expected one of {list(RULE_INITS)}, got {config.phm_c_init!r}.")
    if config.hypercomplex_nonlinearity not in W_INITS:
        raise config.fail(path, "hypercomplex_nonlinearity", f"expected one of {list(W_INITS)}, got "
                          f"{config.hypercomplex_nonlinearity!r}.")
    if config.shared_W_phm and isinstance(config.reduction_factor, dict):
        raise config.fail(path, "reduction_factor", "shared_W_phm shares one weight of one bottleneck size across "
                          "layers, so the reduction factor must be a single number, not a per-layer mapping.")


def check_sizes(config, hidden: int, down: int, factor: float, path: str) -> None:
    """phm_dim must divide both sides of each projection (the reference asserts it)."""
    for what, size in (("hidden size", hidden), ("bottleneck size", down)):
        if size % config.phm_dim:
            raise UserError(f"{path}.phm_dim: {config.phm_dim} does not divide the {what} {size} (hidden "
                            f"{hidden}, reduction_factor {factor} -> bottleneck {down}); choose a phm_dim that "
                            "divides both, or a reduction_factor giving a multiple of it.")


class SharedPHM(nn.Module):
    """The tensors every PHM layer of one adapter shares (reference: `shared_parameters[NAME]`)."""

    def __init__(self, config, hidden: int, down: int) -> None:
        super().__init__()
        n = config.phm_dim
        if config.shared_W_phm:
            shapes = {"down": (hidden // n, down // n), "up": (down // n, hidden // n)}
            for position, (fan_in, fan_out) in shapes.items():
                if config.factorized_phm_W:
                    left = nn.Parameter(torch.empty(n, fan_in, config.phm_rank))
                    right = nn.Parameter(torch.empty(n, config.phm_rank, fan_out))
                    self.register_parameter(f"W_{position}_left", left)
                    self.register_parameter(f"W_{position}_right", right)
                    _init_w(config, left, right)
                else:
                    weight = nn.Parameter(torch.empty(n, fan_in, fan_out))
                    self.register_parameter(f"W_{position}", weight)
                    _init_w(config, weight)
        if config.shared_phm_rule:
            _add_rule(self, config, shared=True)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]


class PHMLayer(nn.Module):
    """y = x · sum_i(C_i ⊗ W_i) + b; attribute names mirror the reference `PHMLayer` (W_left, W_right, b)."""

    def __init__(self, in_features: int, out_features: int, position: str, config) -> None:
        super().__init__()
        n = config.phm_dim
        self.position = position
        self.shared_rule = bool(config.shared_phm_rule)
        self.shared_w = bool(config.shared_W_phm)
        self.factorized_rule = bool(config.factorized_phm_rule)
        self.factorized_w = bool(config.factorized_phm_W)
        if not self.shared_rule:
            _add_rule(self, config, shared=False)
        if not self.shared_w:
            if self.factorized_w:
                self.W_left = nn.Parameter(torch.empty(n, in_features // n, config.phm_rank))
                self.W_right = nn.Parameter(torch.empty(n, config.phm_rank, out_features // n))
                _init_w(config, self.W_left, self.W_right)
            else:
                self.W = nn.Parameter(torch.empty(n, in_features // n, out_features // n))
                _init_w(config, self.W)
        self.b = nn.Parameter(torch.zeros(out_features)) if config.phm_bias else None

    def _pick(self, shared: dict[str, torch.Tensor], name: str, local: str) -> torch.Tensor:
        return shared[name] if name in shared else getattr(self, local)

    def forward(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.factorized_w:
            prefix = f"W_{self.position}" if self.shared_w else "W"
            weight = torch.bmm(self._pick(shared, f"{prefix}_left", "W_left"),
                               self._pick(shared, f"{prefix}_right", "W_right"))
        else:
            weight = self._pick(shared, f"W_{self.position}", "W")
        if self.factorized_rule:
            rule = torch.bmm(self._pick(shared, "phm_rule_left", "phm_rule_left"),
                             self._pick(shared, "phm_rule_right", "phm_rule_right"))
        else:
            rule = self._pick(shared, "phm_rule", "phm_rule")
        y = torch.matmul(x, kronecker_product(rule, weight).sum(0))
        return y + self.b if self.b is not None else y
