"""The graph visualizer (`fxadapt inspect`): snapshots, diffs, and every output format on tiny models.

One tiny BERT goes through the real passes (LoRA `a` on q/v, seq_bn `b`, then merge_lora + DCE), so
the three stages hold inserted, removed, merged and rewired nodes. Browser checks of the HTML page are
in test_visualizer_browser.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from fxadapt.errors import UserError
from fxadapt.tools.graph_json import diff, snapshot
from fxadapt.tools.hierarchy import ROOT, build_hierarchy, node_item
from fxadapt.tools.render import FORMATS, render
from fxadapt.tools.style import ADAPTER_PALETTE, adapter_colors
from fxadapt.tools.union import build_union


def build_stages(model: str = "builtin:tiny-bert") -> list[dict]:
    """captured -> rewritten (LoRA a on q/v, seq_bn b) -> optimized (merge_lora, dead-code elimination)."""
    from fxadapt.capture import capture
    from fxadapt.passes.cleanup import eliminate_dead_code
    from fxadapt.passes.insert_adapters import insert_adapters
    from fxadapt.passes.manager import run_passes
    from fxadapt.passes.merge_lora import merge_lora
    from fxadapt.sites import find_sites
    from fxadapt.spec import Spec, parse_spec

    gm = capture(model).module
    sites = find_sites(gm)
    parsed = parse_spec({"adapters": {"a": "lora[r=4,alpha=8]", "b": "seq_bn"}, "active": "a"})
    spec = Spec(parsed.adapters, ["a", "b"])  # both active: the spec parser allows one name only yet
    stages = [snapshot(gm, "captured")]
    gm, _ = run_passes(gm, [("insert_adapters", lambda g: insert_adapters(g, spec, sites))])
    stages.append(snapshot(gm, "rewritten"))
    gm, _ = run_passes(gm, [("merge_lora", merge_lora), ("eliminate_dead_code", eliminate_dead_code)])
    stages.append(snapshot(gm, "optimized"))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[dict]:
    return build_stages()


def by_name(snap: dict) -> dict[str, dict]:
    return {n["name"]: n for n in snap["nodes"]}


# --- snapshots ---------------------------------------------------------------------------------------

def test_snapshot_is_plain_json_with_metadata(stages):
    captured, rewritten, _ = stages
    assert json.loads(json.dumps(stages)) == stages
    nodes = by_name(captured)
    query = next(n for n in captured["nodes"] if (n["site"] or {}).get("role") == "attn.q")
    assert query["site"] == {"role": "attn.q", "layer": 0, "module": "encoder.layer.0.attention.self.query"}
    assert query["module"] == "encoder.layer.0.attention.self.query" and query["module_type"].endswith("Linear")
    assert [p for p, _ in query["module_stack"]][:3] == ["", "encoder", "encoder.layer.0"]
    assert query["shapes"][0][-1] == 32 and query["dtypes"] == ["float32"]
    weight = nodes["encoder_layer_0_attention_self_query_weight"]
    assert weight["op"] == "get_attr" and weight["params"][""]["shape"] == [32, 32]
    assert weight["module"] == "encoder.layer.0.attention.self.query"  # placed with its owner
    lora = by_name(rewritten)["fxadapt_a_l0_attn_q"]
    assert lora["origin"] == {"adapter": "a", "method": "lora", "pass": "insert_adapters", "site": "attn.q",
                              "layer": 0}
    assert {k: v["shape"] for k, v in lora["params"].items()} == {"lora_A": [4, 32], "lora_B": [32, 4]}
    assert lora["module"] == "encoder.layer.0.attention.self.query"  # inherited from its anchor
    assert lora["inputs"] == query["inputs"][:1] and lora["users"] == ["add_tensor"]  # delta of the same x


def test_snapshot_records_merges(stages):
    merged = [n for n in stages[2]["nodes"] if n["merged"]]
    assert {n["site"]["role"] for n in merged} == {"attn.q", "attn.v"}
    assert all(n["merged"] == [{"adapter": "a", "method": "lora", "pass": "merge_lora"}] for n in merged)


# --- diffs -------------------------------------------------------------------------------------------

def test_diff_of_rewriting_is_exactly_the_adapter_nodes(stages):
    captured, rewritten, _ = stages
    change = diff(captured, rewritten)
    created = [n["name"] for n in rewritten["nodes"] if n["origin"]]
    assert change["inserted"] == created and len(created) == 14  # 4 LoRAs x 2 nodes + 2 seq_bn x 3 nodes
    assert change["removed"] == [] and change["merged"] == []
    assert "output" in change["rewired"]  # reads the adapted last LayerNorm now
    assert change["before"] == "captured" and change["after"] == "rewritten"


def test_diff_of_optimization_shows_merged_and_removed(stages):
    _, rewritten, optimized = stages
    change = diff(rewritten, optimized)
    old = by_name(rewritten)
    lora_nodes = {n["name"] for n in rewritten["nodes"] if (n["origin"] or {}).get("method") == "lora"}
    assert lora_nodes <= set(change["removed"])
    assert {old[name]["site"]["role"] for name in change["merged"]} == {"attn.q", "attn.v"}
    assert len(change["merged"]) == 4 and change["inserted"] == []
    assert set(change["merged"]) <= set(change["changed"])


def _node(name, op="call_function", target="aten.add.Tensor", inputs=(), **extra):
    return {"name": name, "op": op, "target": target, "inputs": list(inputs), "origin": None, "merged": None,
            "module_stack": [["", "M"]], **extra}


def test_diff_treats_a_reused_name_as_a_new_node():
    before = {"stage": "s0", "nodes": [_node("x", "placeholder", "x"), _node("add", inputs=["x"])]}
    reused = _node("add", target="aten.mul.Tensor", inputs=["x"])
    after = {"stage": "s1", "nodes": [_node("x", "placeholder", "x"), reused, _node("out", "output", "output",
                                                                                   ["add"])]}
    change = diff(before, after)
    assert change["removed"] == ["add"] and change["inserted"] == ["add", "out"] and change["rewired"] == []
    union = build_union([before, after])
    assert union.uid_of[1]["add"] == "add@s1" and union.order == ["x", "add", "add@s1", "out"]


# --- union and hierarchy ----------------------------------------------------------------------------

def test_union_order_agrees_with_every_stage(stages):
    union = build_union(stages)
    where = {uid: i for i, uid in enumerate(union.order)}
    for index, snap in enumerate(stages):
        positions = [where[union.uid_of[index][n["name"]]] for n in snap["nodes"]]
        assert positions == sorted(positions)
    assert len(union.order) == len(set(union.order)) == len(union.records)


def test_hierarchy_follows_module_stacks_and_ranks_follow_edges(stages):
    union = build_union(stages)
    hierarchy = build_hierarchy(union)
    lora = node_item("fxadapt_a_l0_attn_q")
    assert hierarchy.ancestors(lora) == [ROOT, "g:encoder", "g:encoder.layer.0", "g:encoder.layer.0.attention",
                                         "g:encoder.layer.0.attention.self", "g:encoder.layer.0.attention.self.query"]
    top = {hierarchy.groups[g].label: hierarchy.place[g][0] for g in hierarchy.groups[ROOT].children
           if g.startswith("g:")}
    assert set(top) == {"ops", "embeddings", "encoder", "pooler"}  # mask arithmetic folded into "ops"
    assert top["embeddings"] < top["encoder"] < top["pooler"]
    layers = hierarchy.groups["g:encoder"].children
    assert [hierarchy.place[g][0] for g in layers] == [0, 1]  # layer 1 below layer 0
    inside = hierarchy.groups["g:encoder.layer.0.attention.self.query"].children
    rank = {item: hierarchy.place[item][0] for item in inside}
    assert rank[node_item("linear")] < rank[node_item("add_tensor")]  # add(linear, lora(x)) below both
    assert rank[lora] < rank[node_item("add_tensor")]
    assert set(hierarchy.place) == set(hierarchy.parent)  # every item placed, once


# --- formats -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_renders_one_and_three_stages(stages, fmt):
    for chosen in (stages[:1], stages):
        out = render(chosen, fmt)
        assert isinstance(out, str) and len(out) > 200


def test_text_table_lists_sites_adapters_and_parameter_counts(stages):
    text = render(stages, "text")
    assert text.startswith("stages: captured (")
    assert "4 merged" in text
    layer0 = text.split("layer 0")[1].split("layer 1")[0]
    assert re.search(r"attn\.q\s+encoder\.layer\.0\.attention\.self\.query\s+a \(lora\) 256 params  "
                     r"\[merged by merge_lora\]", layer0)
    assert re.search(r"residual\.ffn\s+encoder\.layer\.0\.output\s+b \(bottleneck\) 162 params\n", layer0)
    assert re.search(r"attn\.k\s+encoder\.layer\.0\.attention\.self\.key\s+-", layer0)
    assert re.search(r"a\s+lora\s+4\s+1,024\s+merged by merge_lora", text)
    assert re.search(r"b\s+bottleneck\s+2\s+324\s+active", text)


def test_json_is_the_documented_document(stages):
    document = json.loads(render(stages, "json"))
    assert document["format"] == "fxadapt.graph.stages" and document["version"] == 1
    assert [s["stage"] for s in document["stages"]] == ["captured", "rewritten", "optimized"]
    assert document["diffs"] == [diff(stages[0], stages[1]), diff(stages[1], stages[2])]


def test_dot_is_well_formed_and_marks_adapters_and_changes(stages):
    dot = render(stages[:2], "dot", depth=6)
    assert dot.startswith("digraph fxadapt {") and dot.count("{") == dot.count("}")
    declared = set(re.findall(r'^\s*("[^"]+") \[', dot, re.M))
    for a, b in re.findall(r'^\s*("[^"]+") -> ("[^"]+")', dot, re.M):
        assert a in declared and b in declared
    assert 'subgraph "cluster_g:encoder.layer.0"' in dot
    colors = adapter_colors(["a/lora", "b/bottleneck"])
    assert f'fillcolor="{colors["a/lora"]}"' in dot and "penwidth=2.5" in dot  # an inserted LoRA node
    if shutil.which("dot"):  # Graphviz is optional; where it is installed, it must accept the file
        subprocess.run(["dot", "-Tsvg", "-o", "/dev/null"], input=dot, text=True, check=True, timeout=60)


def test_svg_is_valid_xml_with_legend_and_diff_marks(stages):
    svg = render(stages, "svg", depth=6)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and float(root.get("width")) > 300
    text = " ".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert "optimized vs rewritten" in text and "a/lora" in text and "b/bottleneck" in text
    assert 'stroke="#7c3aed"' in svg  # merged linears
    assert 'stroke-dasharray="5 3"' in svg  # removed LoRA nodes drawn as ghosts


def test_html_is_self_contained(stages):
    page = render(stages, "html")
    assert page.startswith("<!doctype html>")
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert page.count("</script>") == 2  # the data block cannot close its element early
    data = json.loads(re.search(r'<script type="application/json" id="fxadapt-data">(.*?)</script>', page,
                                re.S).group(1))
    assert [s["stage"] for s in data["stages"]] == ["captured", "rewritten", "optimized"]
    assert set(data["diffs"]) == {"0,1", "0,2", "1,2"}
    assert len(data["records"]) < sum(len(s["nodes"]) for s in data["stages"]) / 2  # shared across stages


def test_unknown_format_and_no_stages_are_user_errors(stages):
    with pytest.raises(UserError, match="choose one of: html, text, dot, json, svg"):
        render(stages, "png")
    with pytest.raises(UserError, match="no graph snapshots"):
        render([], "html")


def test_adapter_colours_are_stable_and_distinct():
    keys = ["a/lora", "b/bottleneck", "sentiment/lora"]
    first = adapter_colors(keys)
    assert first == adapter_colors(list(reversed(keys)))
    assert len(set(first.values())) == 3 and set(first.values()) <= set(ADAPTER_PALETTE)
    assert adapter_colors(["a/lora"])["a/lora"] == first["a/lora"]  # no collision: same colour alone
