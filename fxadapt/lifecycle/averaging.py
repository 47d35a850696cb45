"""average_adapter: a new adapter whose modules combine existing adapters' modules, per site.

With weights w_i (normalised to sum 1 unless normalize_weights=False), per site and parameter, as in
`adapters` 1.3.0 (methods/adapter_layer_base.py and methods/lora.py `average_adapter`):

    linear                     theta = sum_i w_i theta_i                     (every parameter)
    lora_linear_only_negate_b  A = sum_i |w_i| A_i,   B = sum_i w_i B_i      (Zhang et al., 2023)
    lora_delta_w_svd           dW = sum_i w_i B_i A_i  (unscaled, as the reference's delta_w)
                               U, S, V = svd(dW);  A = V[:k],  B = U[:, :k] diag(S[:k]),  r := k = svd_rank

The new adapter takes the inputs' config (which must agree up to dropout and init_weights), with
r = svd_rank for lora_delta_w_svd; so its scaling alpha / r uses the new rank, as in the reference.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UserError
from ..methods.base import MethodConfig

STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")
_IGNORED = ("dropout", "init_weights", "init_weights_seed")


def normalized_weights(names: list[str], weights: list[float] | None, normalize: bool) -> dict[str, float]:
    if not names:
        raise UserError("average_adapter: no adapters to average; pass at least one adapter name.")
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    if len(weights) != len(names):
        raise UserError(f"average_adapter: {len(weights)} weights for {len(names)} adapters; pass one weight per "
                        "adapter.")
    total = sum(weights) if normalize else 1.0
    if total == 0:
        raise UserError("average_adapter: the weights sum to 0 and cannot be normalised; pass normalize_weights="
                        "False or other weights.")
    return {name: weight / total for name, weight in zip(names, weights, strict=True)}


def averaged_config(configs: dict[str, MethodConfig], strategy: str, svd_rank: int | None) -> MethodConfig:
    """The config of the new adapter: the inputs' common config (r = svd_rank for lora_delta_w_svd)."""
    if strategy not in STRATEGIES:
        raise UserError(f"average_adapter: unknown combine_strategy {strategy!r}; choose one of "
                        f"{', '.join(STRATEGIES)}.")
    names = list(configs)
    first = configs[names[0]]

    def comparable(config: MethodConfig) -> dict:
        return {k: v for k, v in config.to_dict().items() if k not in _IGNORED}

    for name in names[1:]:
        if type(configs[name]) is not type(first) or comparable(configs[name]) != comparable(first):
            raise UserError(f"average_adapter: adapters {names[0]!r} and {name!r} have different configurations; "
                            "only adapters with the same config (up to dropout and init_weights) can be averaged.")
    if strategy not in first.combine_strategies:
        raise UserError(f"average_adapter: combine_strategy {strategy!r} applies to LoRA adapters only; use "
                        f"\"linear\" for a {first.architecture} adapter.")
    if strategy == "lora_delta_w_svd":
        if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1:
            raise UserError(f"average_adapter: lora_delta_w_svd needs svd_rank, a positive integer (got {svd_rank!r}).")
        return dataclasses.replace(first, r=svd_rank)
    return dataclasses.replace(first)


def average_state(modules: dict[str, nn.Module], weights: dict[str, float], strategy: str,
                  svd_rank: int | None) -> dict[str, torch.Tensor]:
    """The state dict of one averaged site from the same site's module of each input adapter."""
    if strategy == "lora_delta_w_svd":
        return _delta_w_svd(modules, weights, svd_rank)
    state: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        for key, value in modules[name].state_dict().items():
            factor = abs(weight) if strategy == "lora_linear_only_negate_b" and "lora_A" in key else weight
            state[key] = state[key] + factor * value if key in state else factor * value
    return state


def _delta_w_svd(modules: dict[str, nn.Module], weights: dict[str, float], svd_rank: int | None) -> dict[str,
                                                                                                          torch.Tensor]:
    if any(getattr(module, "chunks", ()) for module in modules.values()):
        raise UserError("average_adapter: lora_delta_w_svd cannot split a fused q/k/v projection's update (GPT-2's "
                        "c_attn) back into per-matrix LoRA factors; use \"linear\" or "
                        "\"lora_linear_only_negate_b\".")
    # Same operations, in the same order, as the reference's _average_adapter_lora_delta_w_svd.
    delta_w = torch.stack([modules[name].lora_B @ modules[name].lora_A for name in weights], dim=0)
    factors = torch.tensor(list(weights.values()), device=delta_w.device).view(-1, 1, 1)
    delta_w = (delta_w * factors).sum(dim=0)
    u, s, v = torch.linalg.svd(delta_w)
    u, s, v = u[:, :svd_rank], s[:svd_rank], v[:svd_rank, :]
    return {"lora_A": v, "lora_B": u @ torch.diag(s)}
