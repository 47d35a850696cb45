"""PEFT LoRA (Hugging Face `peft` LoraConfig, peft_type "LORA"), loaded from PEFT checkpoints.

    y' = W x + b + s · (B A dropout(x) + b_B)           s = lora_alpha / r, or lora_alpha / sqrt(r) (use_rslora)
    y' = f ⊙ (W x + s · B A x) + b,  f = m / ||W + s·B A||_row        (use_dora; m = lora_magnitude_vector)

(b_B only with `lora_bias`.) PEFT targets modules by name, so any projection can be adapted: every
linear / Conv1D of the graph is named by its module path (fxadapt/projections.py) and matched as PEFT
does (`check_target_module_exists`): exclusions first (`exclude_modules`: a string is a full-match
regex, a list matches exact names or dotted suffixes; `modules_to_save` are never adapted); then a
string `target_modules` is a full-match regex and a list matches exact names, or dotted suffixes
restricted to `layers_to_transform` (layer index from PEFT's regex, or after `layers_pattern`).
"all-linear" is every projection except the output head (the classification head too when
task_type is SEQ_CLS). `rank_pattern` / `alpha_pattern` keys are regexes matched against the end of
the module path (PEFT's `get_pattern_key`). `fan_in_fan_out` needs no handling: a Conv1D's layout is
read from the graph. `bias` ("all", "lora_only") only changes which base biases the checkpoint
carries; the loader writes them into the base model (checkpoints/peft.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import fx, nn

from ... import safe_regex
from ...errors import UserError
from ...graph_edit import add_module, slug
from ...projections import find_projections, output_heads
from ...sites import LinearSite, SiteMap
from ..base import MethodConfig, Placement, SiteModule, freeze, require_type
from ..slot_rule import SlotRule
from .dora import oriented, row_norm, site_weight
from .family import FamilyModule, apply_at, weight_and_bias

NAME = "peft_lora"
# Wherever AdapterHub LoRA composes (PEFT itself has no blocks); site.py.
BLOCKS: tuple[str, ...] = ("stack", "batch_split", "average", "parallel", "multi_task")
PRESETS: dict[str, dict[str, Any]] = {}
ALIASES: dict[str, str] = {}
SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES
# PEFT fields with no effect on the loaded forward pass (bookkeeping or initialisation only).
INERT = {"base_model_name_or_path", "revision", "peft_version", "auto_mapping", "inference_mode",
         "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
         "qalora_group_size", "ensure_weight_tying", "runtime_config", "target_modules_to_tie"}


@dataclass
class Config(MethodConfig):
    """The forward-relevant fields of PEFT's LoraConfig (names as in adapter_config.json)."""

    architecture = "peft_lora"
    peft_type: str = "LORA"
    task_type: str | None = None
    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    lora_dropout: float = 0.0
    modules_to_save: list[str] | None = None

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: str) -> Config:
        names = {f.name for f in cls.__dataclass_fields__.values()}
        # PEFT adds options with every release; one that is unset cannot change the forward pass.
        active = sorted(k for k, v in values.items() if k not in names | INERT and v not in (None, False, [], {}, ""))
        if active:
            raise UserError(f"{path}.{active[0]}: the PEFT option {active[0]!r} = {values[active[0]]!r} is not "
                            "supported by fxadapt (it changes the forward pass); supported options: "
                            f"{', '.join(sorted(names - {'peft_type'}))}.")
        config = cls(**{k: v for k, v in values.items() if k in names})
        config.validate(path)
        return config

    def validate(self, path: str) -> None:
        if self.peft_type != "LORA":
            raise self.fail(path, "peft_type", f"only PEFT LoRA checkpoints (\"LORA\") are supported, got "
                            f"{self.peft_type!r}.")
        require_type(self, path, "r", (int,))
        if self.r <= 0:
            raise self.fail(path, "r", f"the rank must be a positive integer, got {self.r}.")
        require_type(self, path, "lora_alpha", (int, float))
        for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            require_type(self, path, key, (bool,))
        if self.bias not in ("none", "all", "lora_only"):
            raise self.fail(path, "bias", f"expected \"none\", \"all\" or \"lora_only\", got {self.bias!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise self.fail(path, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}.")
        if self.target_modules is None or self.target_modules == []:
            raise self.fail(path, "target_modules", "is empty; name the modules to adapt (a regex, a list of "
                            "names or suffixes, or \"all-linear\").")
        for key in ("target_modules", "exclude_modules", "layers_pattern", "modules_to_save"):
            _check_names(self, path, key)
        layers = self.layers_to_transform
        if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or (
                isinstance(layers, list) and all(isinstance(i, int) for i in layers))):
            raise self.fail(path, "layers_to_transform", f"expected a layer index or a list of them, got {layers!r}.")
        for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
            for pattern, value in getattr(self, key).items():
                _compile(pattern, f"{path}.{key}")
                if isinstance(value, bool) or not isinstance(value, kinds) or (key == "rank_pattern" and value <= 0):
                    raise self.fail(path, f"{key}.{pattern}", f"expected a positive number, got {value!r}.")
        if self.use_dora and self.lora_bias:
            raise self.fail(path, "lora_bias", "is not supported together with use_dora (PEFT refuses it too).")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        return (self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r),
                self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha))

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _compile(pattern: str, path: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"{path}: {pattern!r} is not a valid regular expression ({exc}).") from None


def _check_names(config: Config, path: str, key: str) -> None:
    value = getattr(config, key)
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return
    if isinstance(value, str):
        _compile(value, f"{path}.{key}")
        return
    raise config.fail(path, key, f"expected a regex string or a list of module names, got {value!r}.")


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    """PEFT's get_pattern_key: the first pattern matching the end of `name` at a module boundary."""
    return next((key for key in patterns if safe_regex.match(rf"(.*\.)?({key})$", name)), name)


def _layer_index(config: Config, name: str) -> int | None:
    """The layer index PEFT reads from a module name for `layers_to_transform`."""
    if not config.layers_pattern:
        match = safe_regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
        match = next((m for p in patterns if (m := safe_regex.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name))), None)
    return int(match.group("idx")) if match else None


def is_target(config: Config, name: str, heads: set[str]) -> bool:
    """Whether PEFT would adapt the module `name` (see the module docstring)."""
    exclude = config.exclude_modules
    if isinstance(exclude, str) and safe_regex.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and (name in exclude or any(name.endswith(f".{e}") for e in exclude)):
        return False
    if any(safe_regex.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or []):
        return False
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":
        if name not in heads:
            return True
        return name.rpartition(".")[2] in SEQ_CLS_HEADS and config.task_type != "SEQ_CLS"
    if isinstance(targets, str):
        return safe_regex.fullmatch(targets, name) is not None
    if name in targets:
        return True  # exact names bypass layers_to_transform, as in PEFT
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(config, name)
    return index is not None and (index == layers if isinstance(layers, int) else index in layers)


class PeftLoRA(FamilyModule):
    """PEFT's LoRA layer state: `lora_A`/`lora_B` are nn.Linear, so the keys are `lora_A.weight` etc."""

    composition = "add"

    def __init__(self, site: LinearSite, r: int, scaling: float, config: Config) -> None:
        super().__init__()
        self.lora_A = nn.Linear(site.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, site.out_features, bias=config.lora_bias)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(x)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · (B A dropout(x) + b_B)."""
        return self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def update(self, hidden, layer_input, shared=()):
        # PEFT has no composition blocks; in fxadapt's it acts as AdapterHub's ungated LoRA does.
        return self.delta(layer_input if hidden is None else hidden)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B.weight @ self.lora_A.weight * self.scaling

    def fold(self, weight, bias, shared):
        if self.lora_B.bias is not None:
            bias = bias + self.lora_B.bias * self.scaling
        return weight + self.delta_weight().to(weight.dtype), bias


class PeftDoRA(PeftLoRA):
    """PEFT DoRA: `lora_magnitude_vector` [out] (PEFT's checkpoint key); the bias stays outside the norm."""

    composition = "replace"

    def __init__(self, site: LinearSite, r: int, scaling: float, config: Config, weight: torch.Tensor) -> None:
        super().__init__(site, r, scaling, config)
        self.transposed = site.layout == "addmm"
        self.lora_magnitude_vector = nn.Parameter(row_norm(weight))

    def forward(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        return self.combine(y, self.delta(x), weight, bias)

    def combine(self, y, update, weight, bias, shared=()):
        """m / ||W + s·B A||_row ⊙ (W x + update) + b: PEFT keeps the bias outside the norm."""
        factor = self.lora_magnitude_vector / row_norm(oriented(weight, self.transposed) + self.delta_weight())
        out = factor * ((y - bias if bias is not None else y) + update)
        return out + bias if bias is not None else out

    def fold(self, weight, bias, shared):
        merged = weight + self.delta_weight()
        factor = self.lora_magnitude_vector / row_norm(merged)
        return (factor[:, None] * merged).to(weight.dtype), bias


def targets(gm: fx.GraphModule, sites: SiteMap, config: Config, path: str) -> list[LinearSite]:
    projections = find_projections(gm, sites)
    heads = output_heads(gm, projections)
    chosen = [site for site in projections if is_target(config, site.module, heads)]
    if not chosen:
        names = ", ".join(site.module for site in projections[:6])
        raise UserError(f"{path}: the PEFT target_modules {config.target_modules!r} match no linear layer of this "
                        f"model (after exclude_modules/layers_to_transform); its linear layers are e.g. {names}. "
                        "The checkpoint was probably trained on another architecture.")
    return chosen


def build(gm: fx.GraphModule, site: LinearSite, config: Config, path: str) -> PeftLoRA:
    """The PEFT LoRA (or DoRA) module for one targeted projection."""
    r, alpha = config.rank_and_alpha(site.module)
    scaling = config.scaling(r, alpha)
    if config.lora_bias and weight_and_bias(site.nodes[0])[1] is None:
        raise UserError(f"{path}.lora_bias: {site.module} has no bias to add the LoRA bias to.")
    return PeftDoRA(site, r, scaling, config, site_weight(gm, site)) if config.use_dora else \
        PeftLoRA(site, r, scaling, config)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """The PEFT module per targeted projection, for a composed site (the graph is left as is)."""
    found = []
    for site in targets(gm, sites, config, path):
        if site not in sites.linears:
            raise UserError(f"{path}: {site.module} is not an attention or FFN projection; fxadapt composes PEFT "
                            "LoRA only there (where AdapterHub LoRA acts). Exclude it (exclude_modules) or "
                            "activate the adapter alone.")
        found.append(SiteModule("linear", sites.linears.index(site), build(gm, site, config, path), site.module))
    return found


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    for site in targets(gm, sites, config, path):
        module = build(gm, site, config, path)
        module_path = add_module(gm, adapter, slug(site.module), freeze(module))
        origin = {"adapter": adapter, "method": NAME, "pass": "insert_adapters", "site": site.role,
                  "layer": site.layer, "module": site.module}
        count = apply_at(gm, site, module, module_path, origin)
        yield Placement(adapter, NAME, site.role, site.layer, module_path, site.module, count)


def composition_refusal(config: Config) -> str | None:
    """A PEFT LoRA config composes wherever AdapterHub LoRA does; nothing in the config forbids it."""
    return None


def _slot_config(configs: list[Config]) -> Config:
    """A swappable slot's config: the largest rank of any adapter or module, lora_alpha = r (scaling 1)."""
    rank = max([c.r for c in configs] + [r for c in configs for r in c.rank_pattern.values()])
    return replace(configs[0], r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)


# Swappable slots (methods/slot_rule.py): PEFT LoRA pads like AdapterHub LoRA, its per-module scaling folded into
# lora_B (and its bias); DoRA keeps a slot of its own (its norm is over the unscaled B A).
SLOT = SlotRule(free=("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "task_type"),
                sites=("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"),
                fold=("lora_B.weight", "lora_B.bias"), shareable=lambda config: not config.use_dora,
                scaling=lambda config, module: float(config.scaling(*config.rank_and_alpha(module))),
                widen=_slot_config, checkpoint="peft")
