"""MTL-LoRA (Yang et al., 2024) as `adapters` 1.3.0 builds it (`MTLLoRAConfig`, architecture "mtl_lora"):

    h' = W x + b + s · Σ_i c_i · B_i M A dropout(x)      c = exp(w / τ) / Σ_j exp(w_j / τ),  s = alpha / r

A [r, in] (`lora_A`), the n = `n_up_projection` up-projections B_i (`lora_B` [n, out, r]), the task-specific
matrix M (`task_specific.values`: diag(λ) with λ [r] for "singular_values", a full [r, r] matrix for
"linear"), the combination weights w [n] (`weights`) and τ = `weights_sharpness`. With use_gating the
gate g = mean_seq(sigmoid(G x)) replaces s. Placement is LoRA's (`selfattn_lora`/`attn_matrices`,
`intermediate_lora`, `output_lora`, `leave_out`); checkpoint keys `<module>.loras.<name>.lora_A`,
`.lora_B`, `.task_specific.values`, `.weights`, as the reference saves them.

Multi-task use (the reference's): one MTL-LoRA adapter per task, `model.share_parameters(MultiTask(...))`
ties their A and B (M and w stay per task), and a `multi_task` block routes row r to task `task_ids[r]`.
Each task's saved checkpoint holds its own copy of the shared A and B, so fxadapt loads every task as an
independent adapter (equal A/B values give the reference's numbers; site.py);
AdaptedModel.share_parameters ties them again for training (lifecycle/sharing.py). Not mergeable:
the reference's merge_adapter adds a [n, out, in] `lora_B @ lora_A` to W (ignoring M and w), and under
multi_task the update depends on each row's task (docs/reference-deviations.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ...errors import UserError
from ...graph_edit import add_module
from ...sites import SiteMap
from ..base import Placement, SiteModule, freeze, require_type
from . import config as lora_config
from .emit import targets
from .family import FamilyModule, apply_at, gate_mean

NAME = "mtl_lora"
BLOCKS = lora_config.BLOCKS  # the reference's LoRALinear holds MTL-LoRA modules too
# The reference's LoRA.sharable_parameters: share_parameters ties these across a multi-task group.
SHARABLE = ("lora_A", "lora_B")
MATRIX_TYPES = ("singular_values", "linear")
NOT_MERGEABLE = ("MTL-LoRA: the update mixes n_up_projection up-projections through per-task weights; "
                 "adapters 1.3.0 cannot merge it either (its merge adds a [n, out, in] tensor to the weight)")


@dataclass
class Config(lora_config.Config):
    """AdapterHub's MTLLoRAConfig: LoRAConfig plus the multi-task fields."""

    architecture = "mtl_lora"
    combine_strategies = ("linear",)
    n_up_projection: int = 1
    task_specific_matrix_type: str = "singular_values"
    weights_sharpness: float = 0.05

    def validate(self, path: str) -> None:
        require_type(self, path, "n_up_projection", (int,))
        if self.n_up_projection < 1:
            raise self.fail(path, "n_up_projection", f"needs at least one up-projection, got {self.n_up_projection}.")
        if self.task_specific_matrix_type not in MATRIX_TYPES:
            raise self.fail(path, "task_specific_matrix_type", f"expected one of {list(MATRIX_TYPES)}, got "
                            f"{self.task_specific_matrix_type!r}.")
        require_type(self, path, "weights_sharpness", (int, float))
        if not self.weights_sharpness > 0:
            raise self.fail(path, "weights_sharpness", f"the temperature τ of exp(w / τ) must be > 0, got "
                            f"{self.weights_sharpness!r}.")
        # The reference builds MTLLoRA only with composition_mode "add"; it ignores vera_d/vera_b and crashes on
        # use_dora (MTLLoRA does not pass the base weight on). Say which field to change instead.
        if self.composition_mode != "add":
            raise self.fail(path, "composition_mode", "MTL-LoRA adds its update (\"add\"); use the ia3 config for "
                            "\"scale\".")
        super().validate(path)
        if self.use_dora:
            raise self.fail(path, "use_dora", "MTL-LoRA has no DoRA variant (adapters 1.3.0 fails to build one).")
        if self.vera_d is not None:
            raise self.fail(path, "vera_d", "MTL-LoRA has no VeRA variant (adapters 1.3.0 ignores vera_d/vera_b "
                            "for it); remove vera_d and vera_b.")

    @property
    def variant(self) -> str:
        return NAME


PRESETS: dict[str, dict[str, Any]] = {"mtl_lora": {}}
ALIASES: dict[str, str] = {}


class TaskSpecificSingularValue(nn.Module):
    """M = diag(values), values [r] (the reference's TaskSpecificSingularValue)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.ones(rank))

    def forward(self) -> torch.Tensor:
        return torch.diag(self.values)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """t @ diag(values): the same numbers as the matmul (its other terms are exact zeros)."""
        return t * self.values


class TaskSpecificLinear(nn.Module):
    """M = values, [r, r] (the reference's TaskSpecificLinear, which fails to construct in 1.3.0)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.values = nn.Parameter(torch.ones(rank, rank))

    def forward(self) -> torch.Tensor:
        return self.values

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        return torch.matmul(t, self.values)


TASK_SPECIFIC = {"singular_values": TaskSpecificSingularValue, "linear": TaskSpecificLinear}


class MTLLoRA(FamilyModule):
    """delta(x) = s · Σ_i c_i (dropout(x) A^T M B_i^T); attribute names mirror the reference `MTLLoRA`."""

    composition = "add"
    not_mergeable = NOT_MERGEABLE

    def __init__(self, in_features: int, out_features: int, config: Config) -> None:
        super().__init__()
        self.r = config.r
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(config.n_up_projection, out_features, config.r))
        self.task_specific = TASK_SPECIFIC[config.task_specific_matrix_type](config.r)
        self.weights = nn.Parameter(torch.ones(config.n_up_projection))
        self.weights_sharpness = float(config.weights_sharpness)
        self.scaling = config.scaling
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.gated = config.use_gating
        with torch.no_grad():  # the reference: LoRA's init of A; B re-created as zeros (normal for "bert")
            if config.init_weights == "bert":
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)
            elif config.init_weights == "ia3":
                nn.init.ones_(self.lora_A)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5) if config.init_weights == "lora" else 0)
        if self.gated:
            self.gate = nn.Linear(in_features, 1)
            nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x, x)

    def delta(self, hidden: torch.Tensor, layer_input: torch.Tensor) -> torch.Tensor:
        """The reference MTLLoRA.forward(hidden_states, layer_input): its scaled (or gated) update of `hidden`."""
        t = self.task_specific.apply(F.linear(self.lora_dropout(hidden), self.lora_A))  # x A^T M, [..., r]
        n, out_features, r = self.lora_B.shape
        # One broadcast matmul, as the reference's `t @ lora_B.unsqueeze(1).transpose(-1, -2)`: [n, ..., out].
        ups = torch.matmul(t, self.lora_B.transpose(-1, -2).reshape(n, *[1] * (t.dim() - 2), r, out_features))
        w = (self.weights / self.weights_sharpness).exp()
        out = torch.sum(w.view(-1, *[1] * (ups.dim() - 1)) * ups / w.sum(), 0)
        if self.gated:
            return out * gate_mean(self.gate, layer_input).unsqueeze(-1)
        return out * self.scaling

    def update(self, hidden, layer_input, shared=()):
        return self.delta(layer_input if hidden is None else hidden, layer_input)

    def fold(self, weight, bias, shared):
        raise UserError(NOT_MERGEABLE)


def check_site(site, chunks: tuple[bool, ...], path: str) -> None:
    if chunks:
        raise UserError(f"{path}: MTL-LoRA on a fused q/k/v projection ({site.module}) is not supported; adapt "
                        "models with separate q/k/v projections, or use lora.")


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """The MTLLoRA module per adapted projection, for a composed site (the graph is left as is)."""
    found = []
    for site, chunks in targets(sites, config):
        check_site(site, chunks, path)
        found.append(SiteModule("linear", sites.linears.index(site), MTLLoRA(site.in_features, site.out_features,
                                                                            config), f"{site.module}.loras"))
    return found


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    for site, chunks in targets(sites, config):
        check_site(site, chunks, path)
        module = freeze(MTLLoRA(site.in_features, site.out_features, config))
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        origin = {"adapter": adapter, "method": NAME, "pass": "insert_adapters", "site": site.role,
                  "layer": site.layer}
        count = apply_at(gm, site, module, module_path, origin)
        yield Placement(adapter, NAME, site.role, site.layer, module_path, f"{site.module}.loras", count)


def composition_refusal(config: Config) -> str | None:
    """MTL-LoRA composes wherever LoRA does (the reference's LoRALinear holds it); `site_modules` refuses the
    model-dependent case (a fused q/k/v projection)."""
    return None


def describe_sites(config: Config) -> str:
    """The sites this config needs, for insert_adapters' "no site for this adapter" error (LoRA's placement)."""
    return "attention projections " + "/".join(config.attn_matrices) + " or FFN projections"
