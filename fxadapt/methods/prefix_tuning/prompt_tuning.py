"""Prompt tuning (Lester et al., 2021) as in `adapters` 1.3.0: P learned embeddings join the sequence
right after the embedding layer, so every later tensor (and the output) is P positions longer.

With E the embedding output (B, S, H) and prompt T (P, H), broadcast over the batch:

    combine="prefix":            E' = [T ; E]
    combine="prefix_after_bos":  E' = [E_0 ; T ; E_1..]
    mask' = mask with P "attend" entries prepended on every sequence-sized axis

as the reference extends the mask (also for `prefix_after_bos`, and also on the query axis, so prompt
queries see every key). Shape arguments computed from the input length S are recomputed from S + P
downstream of E'. The prompt gets no position embedding (it joins after them, as in the reference);
models that derive other sequence-length tensors (rotary embeddings, position biases) are refused,
as the reference does not support prompt tuning on them either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn

from ...attention_sites import AttentionCore, find_attention_cores, is_causal, pad_mask
from ...errors import UserError
from ...graph_edit import Emitter, add_module
from ...graph_ops import aten, module_path
from ...sites import SiteMap
from ..base import MethodConfig, Placement, SiteModule, freeze, require_type
from ..slot_rule import SlotRule, refused

NAME = "prompt_tuning"
# The reference's PromptTuningLayer is no composable layer (it runs the setup's first adapter only) and a
# prompt lengthens every row alike; fxadapt activates prompt tuning alone.
BLOCKS: tuple[str, ...] = ()


@dataclass
class Config(MethodConfig):
    """AdapterHub's PromptTuningConfig (`random_uniform_scale` is a class constant there, never saved)."""

    architecture = "prompt_tuning"
    prompt_length: int = 10
    prompt_init: str = "random_uniform"
    prompt_init_text: str | None = None
    combine: str = "prefix"
    init_weights_seed: int | None = None
    random_uniform_scale: float = 0.5

    def validate(self, path: str) -> None:
        require_type(self, path, "prompt_length", (int,))
        if self.prompt_length < 1:
            raise self.fail(path, "prompt_length", f"must be a positive integer, got {self.prompt_length}.")
        if self.combine not in ("prefix", "prefix_after_bos"):
            raise self.fail(path, "combine", f"expected \"prefix\" or \"prefix_after_bos\", got {self.combine!r}.")
        if self.prompt_init not in ("random_uniform", "from_string"):
            raise self.fail(path, "prompt_init", f"expected \"random_uniform\" or \"from_string\", got "
                            f"{self.prompt_init!r}.")
        # A checkpoint (`{"load": DIR}`, read at `<path>.load`) carries trained values, so its init is moot;
        # a new from_string prompt would need the model's tokenizer, which fxadapt does not load.
        if self.prompt_init == "from_string" and not path.endswith(".load"):
            raise self.fail(path, "prompt_init", "\"from_string\" needs the model's tokenizer, which fxadapt does "
                            "not load; use \"random_uniform\", or load a trained checkpoint with {\"load\": DIR}.")


PRESETS = {"prompt_tuning": {}}
ALIASES: dict[str, str] = {}
# Swappable models (methods/slot_rule.py): a prompt changes the sequence length every later op sees.
SLOT = SlotRule(refusal=refused("no prompt is the identity (a prompt lengthens the sequence)"))


class PromptTuning(nn.Module):
    """The reference's PromptTuning: a learned prompt joined to the embedded input."""

    def __init__(self, hidden: int, config: Config) -> None:
        super().__init__()
        self.after_bos = config.combine == "prefix_after_bos"
        self.prompt_embedding = nn.Embedding(config.prompt_length, hidden)
        with torch.no_grad():
            scale = config.random_uniform_scale
            self.prompt_embedding.weight.uniform_(-scale, scale)

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt_embedding.weight.unsqueeze(0).expand(embedded.shape[0], -1, -1)
        joined = torch.cat([prompt, embedded], dim=1)
        if not self.after_bos:
            return joined
        # [E_0 ; T ; E_1..] as a gather from [T ; E]: slicing E[:, 1:] would make torch.export guard S - 1 != 1.
        length = prompt.shape[1]
        t = torch.cumsum(torch.ones_like(joined[..., 0], dtype=torch.int64), 1) - 1
        source = torch.where(t == 0, length, torch.where(t <= length, t - 1, t))
        return torch.gather(joined, 1, source.unsqueeze(-1).expand(-1, -1, joined.shape[-1]))


def composition_refusal(config: Config) -> str | None:
    return None  # BLOCKS is empty: compose/rules.py refuses every block


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    return []  # joins no block (BLOCKS), so lower_composition never asks


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    embedded = sites.embeddings
    val = embedded.meta.get("val") if embedded is not None else None
    if val is None or val.dim() != 3:
        raise UserError(f"{path}: prompt tuning needs the embedding output entering the first layer; this model "
                        "has none that fxadapt recognises.")
    length = val.shape[1]
    if isinstance(length, torch.SymInt):
        bound = length.node.shape_env.bound_sympy(length.node.expr).upper
        if config.prompt_length >= int(bound):
            raise UserError(f"{path}.prompt_length: {config.prompt_length} leaves no room for input tokens within "
                            f"the model's {int(bound)} positions; use a shorter prompt.")
    cores = find_attention_cores(gm, sites)
    downstream = _downstream(embedded)
    # Before any edit: refuse models the prompt cannot lengthen.
    _check(cores, downstream - {embedded}, downstream, length, path)
    origin = {"adapter": adapter, "method": NAME, "pass": "insert_adapters", "site": "embeddings", "layer": -1}
    module = add_module(gm, adapter, "prompt", freeze(PromptTuning(int(val.shape[-1]), config)))
    em = Emitter(gm, embedded, origin)
    prompted = em.call_module(module, (embedded,), keep_val=False)
    new_length = em.call_function(aten.sym_size.int, (prompted, 1), keep_val=False)
    em.reroute(embedded, prompted)
    inserted = len(em.created) + _lengthen(gm, cores, downstream, length, new_length, config.prompt_length, origin)
    yield Placement(adapter, NAME, "embeddings", -1, module, "prompt_tuning.prompt_tunings", inserted)


def _core_masks(cores: list[AttentionCore], downstream: set[fx.Node]) -> list[AttentionCore]:
    return [c for c in cores if c.mask is not None and c.mask.node not in downstream]


def _check(cores: list[AttentionCore], consumers: set[fx.Node], downstream: set[fx.Node], length, path: str) -> None:
    for core in cores:
        if is_causal(core):
            raise UserError(f"{path}: prompt tuning on causal (decoder) attention is not supported; like adapters "
                            "1.3.0, fxadapt supports it on bidirectional encoders (BERT, RoBERTa, DistilBERT, ...).")
    masks = {c.mask.node for c in _core_masks(cores, downstream)}
    for node in consumers:
        for source in node.all_input_nodes:
            if source in downstream or source in masks or source.op == "get_attr":
                continue
            source_val = source.meta.get("val")
            if isinstance(source_val, torch.Tensor) and any(_is_length(d, length) for d in source_val.shape):
                raise UserError(
                    f"{path}: prompt tuning lengthens the sequence, but {source.name} "
                    f"({module_path(source) or 'model'}) is another tensor of the input's length (e.g. rotary or "
                    "relative position embeddings) that fxadapt cannot lengthen; prompt tuning works on models whose "
                    "only other sequence-length input is the attention mask, such as BERT-like encoders (the "
                    "reference supports the same).")


def _lengthen(gm: fx.GraphModule, cores: list[AttentionCore], downstream: set[fx.Node], length,
              new_length: fx.Node, amount: int, origin: dict) -> int:
    """Re-point S-derived shape arguments downstream of the prompt to S + P and pad the attention masks."""
    masks: dict[tuple, fx.Node] = {}
    for core in _core_masks(cores, downstream):
        mask = core.mask.node
        dims = {d: amount for d, size in enumerate(mask.meta["val"].shape) if _is_length(size, length)}
        core.mask.replace(pad_mask(gm, mask, dims, core.mask.attend, origin, masks))
    symbol = length.node.expr if isinstance(length, torch.SymInt) else None
    remapped: dict[fx.Node, fx.Node] = {}
    em = Emitter(gm, new_length, origin)
    for node in [n for n in gm.graph.nodes if n in downstream]:
        node.args = fx.node.map_arg(node.args, lambda a: _remap(a, symbol, new_length, remapped, em))
        node.kwargs = fx.node.map_arg(node.kwargs, lambda a: _remap(a, symbol, new_length, remapped, em))
    return len(masks) + len(em.created)


def _is_length(size, length) -> bool:
    if isinstance(length, torch.SymInt) and isinstance(size, torch.SymInt):
        return size.node.expr == length.node.expr
    return not isinstance(size, torch.SymInt) and not isinstance(length, torch.SymInt) and size == length


def _remap(arg: fx.Node, symbol, new_length: fx.Node, remapped: dict, em: Emitter) -> fx.Node:
    """A symbolic-int node in terms of S, rebuilt in terms of S + P (`new_length`)."""
    val = arg.meta.get("val")
    if symbol is None or not isinstance(val, torch.SymInt) or symbol not in val.node.expr.free_symbols:
        return arg
    if arg not in remapped:
        if val.node.expr == symbol:
            remapped[arg] = new_length
        elif arg.op == "call_function":
            args = fx.node.map_arg(arg.args, lambda a: _remap(a, symbol, new_length, remapped, em))
            remapped[arg] = em.call_function(arg.target, args, keep_val=False)
        else:
            raise UserError(f"$: prompt tuning cannot recompute the shape value {arg.name} for the longer sequence.")
    return remapped[arg]


def _downstream(start: fx.Node) -> set[fx.Node]:
    """`start` and every node that depends on it."""
    seen: set[fx.Node] = {start}
    queue = deque([start])
    while queue:
        for user in queue.popleft().users:
            if user not in seen:
                seen.add(user)
                queue.append(user)
    return seen
