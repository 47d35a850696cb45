"""Where the LoRA method acts and how it is wired into the graph: the adapted projections (`targets`),
the variant module per projection (`build`: LoRA, (IA)^3, VeRA/DVoRA or DoRA by `Config.variant`), and
the method's `emit` and `site_modules`. This module imports every variant; the variants import only the
base module (module.py) and the family helpers (family.py), so the family has no import cycle."""

from __future__ import annotations

from collections.abc import Iterator

from torch import fx

from ...errors import UserError
from ...graph_edit import add_module, shared_attrs
from ...sites import LinearSite, SiteMap
from ..base import Placement, SiteModule, freeze
from . import dora, ia3, vera
from .config import Config
from .family import FamilyModule, apply_at
from .module import LoRA


def targets(sites: SiteMap, config: Config) -> list[tuple[LinearSite, tuple[bool, ...]]]:
    """The projections this config adapts, with the enabled chunks of fused q/k/v projections."""
    wanted: set[str] = set()
    if config.selfattn_lora:
        wanted |= {f"attn.{m}" for m in config.attn_matrices}
    ffn_in, ffn_out = ("ffn.down", "ffn.up") if sites.gated_ffn else ("ffn.up", "ffn.down")
    if config.intermediate_lora:
        wanted.add(ffn_in)
    if config.output_lora:
        wanted.add(ffn_out)
    chosen = []
    for site in sites.linears:
        if site.layer in config.leave_out:
            continue
        if site.role == "attn.qkv" and config.selfattn_lora:
            chunks = tuple(role in config.attn_matrices for role in site.fused)
            if any(chunks):
                chosen.append((site, chunks))
        elif site.role in wanted:
            chosen.append((site, ()))
    return chosen


def build(gm: fx.GraphModule, site: LinearSite, config: Config, chunks: tuple[bool, ...], path: str) -> FamilyModule:
    """The module of this config's variant for one site."""
    variant = config.variant
    if variant == "ia3":
        return ia3.IA3(site.in_features, site.out_features, config, chunks)
    if variant in ("vera", "dvora"):
        return vera.build(gm, site, config, chunks, path)
    if variant == "dora":
        return dora.DoRA(gm, site, config, chunks, path)
    return LoRA(site.in_features, site.out_features, config, chunks)


def site_modules(sites: SiteMap, name: str, config: Config, path: str, gm: fx.GraphModule) -> list[SiteModule]:
    """This config's module per adapted projection, for a composed site (the graph is left as is); VeRA adds its
    shared A and B as a "shared" SiteModule, which the composed sites read."""
    chosen = targets(sites, config)
    for site, chunks in chosen:
        if chunks:
            raise UserError(f"{path}: a fused q/k/v projection ({site.module}) cannot hold a composed LoRA (the "
                            "reference's LoRAMergedLinear does not compose). Activate it alone.")
    found = [SiteModule("linear", sites.linears.index(site), build(gm, site, config, chunks, path),
                        f"{site.module}.loras") for site, chunks in chosen]
    if config.variant in ("vera", "dvora") and chosen:
        found.append(SiteModule("shared", 0, vera.make_shared(config, [site for site, _ in chosen], path),
                                vera.SHARED))
    return found


def emit(gm: fx.GraphModule, sites: SiteMap, adapter: str, config: Config, path: str) -> Iterator[Placement]:
    variant = config.variant
    chosen = targets(sites, config)
    attrs: tuple[fx.Node, ...] = ()
    if variant in ("vera", "dvora") and chosen:
        # One frozen A and B for all layers, registered once, read through get_attr by every VeRA module.
        placement = vera.add_shared(gm, adapter, variant, config, [site for site, _ in chosen], path)
        origin = {"adapter": adapter, "method": variant, "pass": "insert_adapters", "site": "shared", "layer": -1}
        attrs = shared_attrs(gm, vera.shared_targets(placement.module_path), origin)
        placement.nodes_inserted = len(attrs)
        yield placement
    for site, chunks in chosen:
        module = freeze(build(gm, site, config, chunks, path))
        module_path = add_module(gm, adapter, f"L{site.layer}_{site.role}", module)
        origin = {"adapter": adapter, "method": variant, "pass": "insert_adapters", "site": site.role,
                  "layer": site.layer}
        count = apply_at(gm, site, module, module_path, origin, attrs)
        yield Placement(adapter, variant, site.role, site.layer, module_path, f"{site.module}.loras", count)


def composition_refusal(config: Config) -> str | None:
    """Every LoRA-family config can join a composition block; what depends on the model (a fused q/k/v
    projection, which the reference's LoRAMergedLinear never composes) is refused in `site_modules`."""
    return None
