"""`--format text`: per layer, each adapter site and the adapters acting there, with parameter counts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .graph_json import diff

# Sites in the order data flows through a layer.
_ROLE_ORDER = ["embeddings", "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "residual.attn", "xattn.q",
               "xattn.k", "xattn.v", "xattn.o", "residual.xattn", "ffn.gate", "ffn.up", "ffn.down", "residual.ffn"]


@dataclass
class _Placement:
    adapter: str
    method: str
    params: int = 0
    module: str = ""
    status: str = "active"  # in the last stage: active, merged (by PASS) or removed


@dataclass
class _Site:
    role: str
    layer: int
    module: str
    adapters: dict[tuple[str, str], _Placement] = field(default_factory=dict)


def render_text(stages: list[dict[str, Any]]) -> str:
    sites = _collect(stages)
    lines = [_stage_line(stages), ""]
    layers = sorted({s.layer for s in sites.values()})
    width = max((len(s.module) for s in sites.values()), default=20)
    for layer in layers:
        in_layer = [s for s in sites.values() if s.layer == layer]
        lines.append("embeddings" if layer < 0 else f"layer {layer}  ({_layer_prefix(in_layer)})")
        for site in sorted(in_layer, key=_role_key):
            described = [_describe(p) for p in site.adapters.values()] or ["-"]
            lines.append(f"  {site.role:<14} {site.module or '(model)':<{width}}  {described[0]}")
            lines += [f"  {'':<14} {'':<{width}}  {text}" for text in described[1:]]
        lines.append("")
    lines += _adapter_totals(sites)
    return "\n".join(lines).rstrip() + "\n"


def _collect(stages: list[dict[str, Any]]) -> dict[tuple[str, int], _Site]:
    sites: dict[tuple[str, int], _Site] = {}
    for snap in stages:
        for node in snap["nodes"]:
            tag = node.get("site")
            if tag and (tag["role"], tag["layer"]) not in sites:
                sites[(tag["role"], tag["layer"])] = _Site(tag["role"], tag["layer"], tag.get("module", ""))
    for index, snap in enumerate(stages):
        last = index == len(stages) - 1
        for node in snap["nodes"]:
            origin = node.get("origin")
            if origin and node["op"] == "call_module" and "site" in origin:
                site = sites.setdefault((origin["site"], origin.get("layer", -1)),
                                        _Site(origin["site"], origin.get("layer", -1), ""))
                placement = site.adapters.setdefault((origin["adapter"], origin["method"]),
                                                     _Placement(origin["adapter"], origin["method"]))
                placement.params = sum(p["numel"] for p in (node.get("params") or {}).values())
                placement.module = node["target"]
            if last and node.get("merged") and node.get("site"):
                tag = node["site"]
                site = sites.setdefault((tag["role"], tag["layer"]), _Site(tag["role"], tag["layer"], ""))
                for record in node["merged"]:
                    key = (record.get("adapter"), record.get("method"))
                    placement = site.adapters.setdefault(key, _Placement(*key))
                    placement.status = f"merged by {record.get('pass')}"
    final = {n["target"] for n in stages[-1]["nodes"] if n["op"] == "call_module"}
    for site in sites.values():
        for placement in site.adapters.values():
            if placement.status == "active" and placement.module not in final:
                placement.status = "removed"
    return sites


def _role_key(site: _Site) -> tuple[int, str]:
    return (_ROLE_ORDER.index(site.role) if site.role in _ROLE_ORDER else len(_ROLE_ORDER), site.role)


def _describe(placement: _Placement) -> str:
    status = "" if placement.status == "active" else f"  [{placement.status}]"
    return f"{placement.adapter} ({placement.method}) {placement.params:,} params{status}"


def _stage_line(stages: list[dict[str, Any]]) -> str:
    parts = [f"{stages[0]['stage']} ({len(stages[0]['nodes'])} nodes)"]
    for before, after in zip(stages, stages[1:], strict=False):
        change = diff(before, after)
        counts = [f"+{len(change['inserted'])}", f"-{len(change['removed'])}"]
        if change["merged"]:
            counts.append(f"{len(change['merged'])} merged")
        parts.append(f"{after['stage']} ({len(after['nodes'])} nodes: {', '.join(counts)})")
    return "stages: " + " -> ".join(parts)


def _layer_prefix(sites: list[_Site]) -> str:
    for site in sites:
        match = re.match(r"^(.*?\.\d+)(\.|$)", site.module)
        if match:
            return match.group(1)
    return "?"


def _adapter_totals(sites: dict[tuple[str, int], _Site]) -> list[str]:
    totals: dict[tuple[str, str], list[Any]] = {}
    for site in sites.values():
        for key, placement in site.adapters.items():
            entry = totals.setdefault(key, [0, 0, set()])
            entry[0] += 1
            entry[1] += placement.params
            entry[2].add(placement.status)
    if not totals:
        return ["adapters: none"]
    lines = ["adapters", f"  {'name':<12} {'method':<12} {'sites':>5} {'params':>10}  status"]
    for (name, method), (count, params, statuses) in sorted(totals.items()):
        lines.append(f"  {name:<12} {method:<12} {count:>5} {params:>10,}  {', '.join(sorted(statuses))}")
    return lines
