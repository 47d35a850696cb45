"""fold_fusion: AdapterFusion folded into its adapters' up-projections equals the unfolded fusion (every
option combination, the reference fusion fixtures, the ONNX artifact) and leaves what it cannot fold alone."""

from __future__ import annotations

import copy
import itertools
import json
from unittest import mock

import onnx
import pytest
import torch

from conftest import REFERENCE, load_case
from fxadapt import Fuse, meta, pipeline
from fxadapt.capture import flatten_outputs
from fxadapt.export.onnx import run_onnx
from fxadapt.methods.bottleneck.fusion import Fusion
from fxadapt.methods.bottleneck.fusion_fold import FoldedFusion
from fxadapt.methods.bottleneck.site import BottleneckSite
from fxadapt.passes.fold_fusion import fold_fusion
from fxadapt.pipeline import build, compile_model
from fxadapt.spec import parse_spec
from reference_eval import _composition_spec, cached_capture

BERT = str(REFERENCE / "models" / "bert")
OPTIONS = ("query", "key", "value", "value_before_softmax", "residual_before", "query_before_ln")
FUSION_CASES = ["bert__fuse", "bert__fuse_compacter_inv", "bert__stack_fuse", "llama__fuse",
                "llama__fuse_compacter_inv"]
# bert__fuse is in the fast tier; the others (Compacter's PHM weights, a Stack around the Fuse, Llama) are slow.
# All slow: the fast tier's bert__fuse reference case (tests/test_reference_parity.py) already runs folded.
SLOW_CASES = {"bert__fuse", "bert__fuse_compacter_inv", "bert__stack_fuse", "llama__fuse",
              "llama__fuse_compacter_inv"}


def _spec(adapters: dict, fuse: list, **fusion):
    return parse_spec({"adapters": adapters, "active": {"fuse": fuse},
                       "fusions": [{"adapters": [a if isinstance(a, str) else a["stack"][-1] for a in fuse],
                                    **fusion}]})


def _build(spec):
    with mock.patch.object(pipeline, "capture", cached_capture):
        return build(BERT, spec)


def _sites(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                 BottleneckSite)]


def _set(gm, node, module) -> None:
    owner, _, leaf = node.target.rpartition(".")
    setattr(gm.get_submodule(owner), leaf, module)


def _run(gm, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return flatten_outputs(gm(**inputs))


def _max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _folded_error(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Max abs error relative to the outputs' scale (1 where they are smaller): the fold reassociates float32 sums,
    so its error grows with the magnitudes the adapters are drawn at (outputs up to ~3 here: 1.1e-5 abs on an AVX-512
    CPU, under 1e-5 on AVX2), while a wrong fold is off by > 1e-3."""
    scale = max(1.0, max(x.abs().max().item() for x in before))
    return _max_error(before, after) / scale


@pytest.fixture(scope="module")
def fused():
    """Fuse(a: r=2, b: r=4 with a learned per-channel scaling) on the tiny BERT, adapters drawn large enough
    that the fusion's attention is far from uniform; returns (result, original site modules)."""
    result = _build(_spec({"a": "seq_bn", "b": "seq_bn[reduction_factor=8,scaling='channel']"}, ["a", "b"]))
    gm = result.graph
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".adapters." in name and "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if name.endswith("scaling") else 0.0))
    return result, {n.target: gm.get_submodule(n.target) for n in _sites(gm)}


def _with_fusion(result, originals, config: dict, seed: int) -> None:
    """Every site of the fixture gets a fresh fusion of `config` with random weights (a new site module each)."""
    gm = result.graph
    generator = torch.Generator().manual_seed(seed)
    for node in _sites(gm):
        site = originals[node.target]
        (name, old), = site.adapter_fusion_layer.items()
        fusion = Fusion({**old.config, **config}, 32).eval()
        with torch.no_grad():
            for p in fusion.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        _set(gm, node, site.with_fusions({name: fusion}))


@pytest.mark.parametrize("values", list(itertools.product((False, True), repeat=len(OPTIONS))),
                         ids=lambda v: "".join("QKVBRL"[i] if on else "-" for i, on in enumerate(v)))
def test_folded_equals_unfolded_for_every_option(fused, values):
    result, originals = fused
    gm, inputs = result.graph, result.captured.example_inputs
    _with_fusion(result, originals, dict(zip(OPTIONS, values, strict=True)), seed=sum(v << i for i, v in
                                                                                      enumerate(values)))
    before = _run(gm, inputs)
    assert fold_fusion(gm).count == 2  # one fusion per layer (the FFN residual site)
    assert all(isinstance(gm.get_submodule(n.target).adapter_fusion_layer["a,b"], FoldedFusion) for n in _sites(gm))
    after = _run(gm, inputs)
    assert _folded_error(before, after) <= 1e-5
    # Not a vacuous comparison: the fusion changes the output (a uniform mix of the adapters would not match).
    _set(gm, _sites(gm)[0], originals[_sites(gm)[0].target])
    assert _max_error(before, _run(gm, inputs)) > 1e-3


def test_fresh_value_initialized_fusion_folds(fused):
    """lower_composition's own fusion (dynamic: value_initialized, nn.Linear's init) folds exactly too."""
    result, originals = fused
    gm, inputs = result.graph, result.captured.example_inputs
    for node in _sites(gm):
        _set(gm, node, originals[node.target])
    assert originals[_sites(gm)[0].target].adapter_fusion_layer["a,b"].config["value_initialized"]
    before = _run(gm, inputs)
    assert fold_fusion(gm).count == 2
    assert _folded_error(before, _run(gm, inputs)) <= 1e-5
    for node in _sites(gm):  # metadata kept and the fold recorded; the unfolded module left as it was
        assert node.meta.get("nn_module_stack") and node.meta[meta.ORIGIN]["pass"] == "lower_composition"
        assert {"adapter": "a,b", "method": "fusion", "pass": "fold_fusion"} in node.meta[meta.MERGED]
        assert isinstance(originals[node.target].adapter_fusion_layer["a,b"], Fusion)


@pytest.mark.parametrize(("adapters", "merged", "tails"), [
    ({"a": "seq_bn", "b": "seq_bn[reduction_factor=8]"}, True, 1),
    ({"a": "seq_bn[non_linearity='relu']", "b": "seq_bn[non_linearity='swish']"}, True, 2),
    ({"a": "seq_bn[ln_before=True]", "b": "seq_bn"}, False, 0),  # a LayerNorm before a's down-projection
    ({"a": "compacter[reduction_factor=4]", "b": "seq_bn"}, False, 0),  # a PHM down-projection
], ids=["alike", "two-activations", "ln-before", "phm"])
def test_down_projections_merge_only_when_plain_linear(adapters, merged, tails):
    """The fused adapters' down-projections become one product of t when each is nn.Linear + its activation (one
    activation op when they are alike); otherwise each adapter computes its own. Exact either way."""
    result = _build(_spec(adapters, ["a", "b"]))
    gm, inputs = result.graph, result.captured.example_inputs
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".adapters." in name or "fusion" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if "norm" in name else 0.0))
    before = _run(gm, inputs)
    count = fold_fusion(gm).count
    folded = [f for n in _sites(gm) for f in gm.get_submodule(n.target).adapter_fusion_layer.values()]
    assert count == len(folded) >= 2 and all(isinstance(f, FoldedFusion) for f in folded)
    assert all(f.merges_down is merged for f in folded)
    assert all(len(f.down_tails) == tails for f in folded if merged)
    assert _folded_error(before, _run(gm, inputs)) <= 1e-5


def test_refusals_are_recorded_and_leave_the_fusion(fused):
    result, originals = fused
    gm = result.graph
    node = _sites(gm)[0]
    cases = {
        "training mode": lambda site: site.adapter_fusion_layer["a,b"].train(),  # the fusion alone suffices
        "temperature": lambda site: site.adapter_fusion_layer["a,b"].config.update(temperature=True),
        "not a linear layer": lambda site: setattr(site.adapters["b"], "adapter_up",
                                                   torch.nn.Sequential(site.adapters["b"].adapter_up).eval()),
    }
    for reason, spoil in cases.items():
        site = copy.deepcopy(originals[node.target])
        spoil(site)
        for other in _sites(gm):
            _set(gm, other, site if other is node else originals[other.target])
        gm.meta["fxadapt"].pop("not_folded", None)
        assert fold_fusion(gm).count == 1  # the other layer's fusion still folds
        assert gm.get_submodule(node.target) is site and isinstance(site.adapter_fusion_layer["a,b"], Fusion)
        (refusal,) = gm.meta["fxadapt"]["not_folded"]
        assert refusal["module"] == f"{node.target}.adapter_fusion_layer.a,b" and reason in refusal["reason"]
        report = pipeline.report_json(result, _spec({"a": "seq_bn", "b": "seq_bn"}, ["a", "b"]), (1e-5, 1e-5))
        assert report["not_folded"] == [refusal]


def test_fuse_over_a_stack_is_left_unfolded():
    """Fuse(Stack(a, c), b): the stack's up-projection reads the state a left, not one adapter's activation."""
    result = _build(_spec({"a": "seq_bn", "b": "seq_bn", "c": "seq_bn"}, [{"stack": ["a", "c"]}, "b"]))
    gm, inputs = result.graph, result.captured.example_inputs
    before = _run(gm, inputs)
    assert fold_fusion(gm).count == 0
    reasons = gm.meta["fxadapt"]["not_folded"]
    assert len(reasons) == 2 and all("stack block" in r["reason"] and r["fusion"] == "c,b" for r in reasons)
    assert all(isinstance(gm.get_submodule(n.target).adapter_fusion_layer["c,b"], Fusion) for n in _sites(gm))
    assert _max_error(before, _run(gm, inputs)) == 0.0


def _matmuls(path, hidden: int) -> tuple[int, int]:
    """(MatMul + Gemm nodes, those whose weight is a hidden x hidden initializer) of an ONNX file."""
    model = onnx.load(str(path))
    square = {i.name for i in model.graph.initializer if list(i.dims) == [hidden, hidden]}
    nodes = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    return len(nodes), sum(any(i in square for i in n.input) for n in nodes)


@pytest.mark.slow  # an ONNX export each; the fast tier exports a folded Fuse in the bert__fuse reference case
@pytest.mark.parametrize("fold", [True, False])
def test_onnx_of_folded_fuse_has_no_hidden_square_fusion_matmuls(tmp_path, fold):
    """Fuse(2 x seq_bn) on the 2-layer BERT: unfolded, query, key and value add three hidden x hidden MatMuls per
    layer to the attention's q, k, v, o and the pooler; folded, none. The artifact is verified (report.json)."""
    spec = _spec({"a": "seq_bn", "b": "seq_bn"}, ["a", "b"])
    spec.optimize["fold_fusion"] = fold
    with mock.patch.object(pipeline, "capture", cached_capture):
        compile_model(BERT, spec, tmp_path, ("onnx",))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and report["passes"].get("fold_fusion") == (2 if fold else None)
    layers = 2
    total, square = _matmuls(tmp_path / "model.onnx", 32)
    assert square == 4 * layers + 1 + (0 if fold else 3 * layers)
    # Folded, a layer's fusion is 4 rank-sized MatMuls (the two down-projections and the scores as one product of
    # the adapters' input, two [Σr, 2] segment sums, the values); unfolded 9 (two downs, two ups, query, two keys,
    # two values).
    assert total == 8 * layers + 1 + (4 if fold else 9) * layers  # 8: q, k, v, 2 in the SDPA, o, FFN up, down


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow if c in SLOW_CASES else ())
                                  for c in FUSION_CASES])
def test_reference_fusion_fixtures_match_folded(case, tmp_path):
    info, io = load_case(case)
    inputs = {"input_ids": io["input_ids"], "attention_mask": io["attention_mask"]}
    with mock.patch.object(pipeline, "capture", cached_capture):
        result = compile_model(str(REFERENCE / "models" / info["arch"]), _composition_spec(case, info), tmp_path,
                               ("onnx",), atol=1e-5, rtol=1e-5)
    assert result.pass_counts["fold_fusion"] > 0
    names = result.captured.output_names
    for got in (_run(result.graph, inputs), [torch.from_numpy(a) for a in run_onnx(tmp_path / "model.onnx", inputs)]):
        for field in info["outputs"]:
            assert (got[names.index(field)] - io[f"out.{field}"]).abs().max().item() <= 1e-5, field


def test_python_api_export_with_a_head_folds_the_fusion(model):
    """AdaptedModel.export() under a head optimizes before capturing the head: the fusion folds there too."""
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn[reduction_factor=8]")
    model.add_adapter_fusion(Fuse("a", "b"))
    with torch.no_grad():
        for module in model.adapter_modules("a") + model.adapter_modules("b") + model._fusion_modules("a,b"):
            for p in module.parameters():
                p.normal_(0.0, 0.3)
    model.set_active_adapters(Fuse("a", "b"))
    model.add_classification_head("a", num_labels=3)
    model.eval()
    inputs = {"input_ids": torch.randint(1, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    program = model.export()
    assert any(name.endswith("score_weight") for name in program.state_dict)
    with torch.no_grad():
        got, ref = program.module()(**inputs)["logits"], model(**inputs).logits
    assert (got - ref).abs().max().item() <= 1e-5
