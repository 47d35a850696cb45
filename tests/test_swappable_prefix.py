"""Swappable prefix tuning (issue #12): prefixes of other lengths share one slot padded to the longest, with an
additive mask the adapter files carry (methods/prefix_tuning/slot.py); every other adapter's file masks the whole
prefix, which is exactly "no prefix".

Fast tests: the slot rule (the slot's config, each adapter's mask, refusals). The slow ones compile the tiny
reference BERT once with a prefix of length 5 (the reference fixture) and a fresh one of length 8 (and another
bottleneck size) sharing one slot, and a LoRA, and compare every adapter file with
that adapter compiled alone, in plain ONNX Runtime and through fxadapt.runtime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import REFERENCE
from fxadapt.cli import main
from fxadapt.errors import UserError
from fxadapt.export import slots, swappable
from fxadapt.export.adapter_files import Layout, Tensor, read_adapter_file, write_adapter_file
from fxadapt.methods.prefix_tuning.slot import MASK_KEY, MASKED, SLOT
from fxadapt.runtime import Session
from fxadapt.spec import parse_spec

CASES = REFERENCE / "cases"
BERT = str(REFERENCE / "models" / "bert")


def test_prefix_slot_takes_the_longest_prefix_and_each_adapter_masks_its_padding():
    spec = parse_spec({"adapters": {"p": "prefix_tuning[prefix_length=3,bottleneck_size=16]",
                                    "q": "prefix_tuning[prefix_length=6,bottleneck_size=8]",
                                    "f": "prefix_tuning_flat", "l": "lora"}, "active": "p"})
    grouped = slots.group(spec)
    assert grouped.members == {"prefix_tuning_slot": ["p", "q"], "prefix_tuning_slot_": ["f"], "lora_slot": ["l"]}
    config = grouped.compiled["prefix_tuning_slot"].config
    assert (config.prefix_length, config.bottleneck_size) == (6, 16)
    mask = SLOT.derived(spec.adapters["p"].config, MASK_KEY, (6,))
    assert mask.tolist() == [0.0] * 3 + [MASKED] * 3
    assert SLOT.derived(spec.adapters["p"].config, "self_prefix.wte.weight", (6, 32)) is None
    # the flat prefix is another config: a slot of its own, a masked one too (refused by swappable_spec: one per model)
    assert {"prefix_tuning_slot", "prefix_tuning_slot_"} <= grouped.shared


@pytest.mark.parametrize("value, match", [
    ({"g": "prefix_tuning[use_gating=True]"}, "gated prefix"),
    ({"u": "prefix_tuning|lora"}, "its prefix_tuning member: a prefix is swappable as an adapter of its own"),
    ({"p": "prefix_tuning", "f": "prefix_tuning_flat"}, "prefix_tuning adapters p; f need 2 slots"),
])
def test_prefix_configs_not_swappable_yet_are_refused(value, match):
    with pytest.raises(UserError, match=match):
        swappable.swappable_spec(parse_spec({"adapters": value, "active": next(iter(value))}))


# ---- slow: the tiny BERT with two prefix slots and a LoRA --------------------------------------------------------

ADAPTERS = ("pre5", "pre8", "lora")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(OUT, {adapter: (inputs, reference outputs of the adapter compiled alone)})."""
    from fxadapt.capture import flatten_outputs  # heavy (transformers): only the slow tests compile
    from fxadapt.pipeline import build, verification_shapes

    root = tmp_path_factory.mktemp("swappable_prefix")
    spec = {"adapters": {"pre5": {"load": str(CASES / "bert__prefix_tuning" / "adapter")},
                         "pre8": "prefix_tuning[prefix_length=8,bottleneck_size=8]",
                         "lora": {"load": str(CASES / "bert__lora_all" / "adapter")}},
            "active": "pre5"}
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "out"
    assert main(["compile", BERT, "--spec", str(root / "spec.json"), "-o", str(out), "--format", "onnx",
                 "--swappable"]) == 0
    references = {}
    for name in ADAPTERS:
        single = build(BERT, parse_spec({"adapters": {name: spec["adapters"][name]}, "active": name}))
        inputs = verification_shapes(single.captured)[1][1]  # the second shape (3x5): not the capture's
        inputs["attention_mask"][0, -2:] = 0  # padded keys in one row: the model's own mask joined to the prefix's
        with torch.no_grad():
            references[name] = (inputs, [t.numpy() for t in flatten_outputs(single.graph(**inputs))])
    return out, references


@pytest.mark.slow
def test_each_prefix_file_gives_its_single_compile_in_plain_onnxruntime_and_the_runtime(compiled):
    out, references = compiled
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    runtime = Session(out)
    outputs = {}
    for name in ADAPTERS:
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / "adapters" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        inputs, expected = references[name]
        outputs[name] = session.run(None, {k: v.numpy() for k, v in inputs.items()}, options)
        served = runtime.run(inputs, adapter=name)
        for got, via_runtime, want in zip(outputs[name], served.values(), expected, strict=True):
            assert np.isfinite(got).all(), name  # a fully masked prefix (the identity) must not give NaN
            assert np.abs(got - want).max() < 1e-5, name
            assert np.abs(via_runtime - want).max() < 1e-5, name
    for a, b in (("pre5", "pre8"), ("pre5", "lora"), ("pre8", "lora")):
        assert np.abs(outputs[a][0] - outputs[b][0]).max() > 1e-3, (a, b)  # the adapters do differ
    inputs, expected = references["pre5"]  # no adapter file: the spec's active adapter
    assert np.abs(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0] - expected[0]).max() < 1e-5


@pytest.mark.slow
def test_prefix_masks_in_the_files(compiled):
    out, _ = compiled
    layout = Session(out).layout
    masks = [t for t in layout.tensors if t.key == MASK_KEY]
    assert [t.adapter for t in masks] == ["prefix_tuning_slot"]  # one per prefix slot and location
    shared = next(t for t in masks if t.adapter == "prefix_tuning_slot")
    assert shared.shape == (8,) and shared.identity == MASKED
    assert layout.slots["prefix_tuning_slot"]["config"]["bottleneck_size"] == 16  # pre5's 16, pre8's 8: the larger
    files = {n: read_adapter_file(out / "adapters" / f"{n}.onnx_adapter", layout) for n in ADAPTERS}
    assert files["pre5"][shared.name].tolist() == [0.0] * 5 + [MASKED] * 3
    assert not files["pre8"][shared.name].any()
    assert (files["lora"][shared.name] == MASKED).all()  # the identity: no prefix at all
    wte = next(t.name for t in layout.tensors if t.adapter == "prefix_tuning_slot" and t.key.endswith("wte.weight"))
    assert files["pre5"][wte].shape == (8, 32) and not files["pre5"][wte][5:].any()  # zero-padded rows


@pytest.mark.slow
def test_adapters_export_of_a_prefix_checkpoint_pads_it_into_the_slot(compiled, tmp_path):
    out, references = compiled
    target = tmp_path / "pre5_again.onnx_adapter"
    assert main(["adapters", "export", str(CASES / "bert__prefix_tuning" / "adapter"), "--model-dir", str(out),
                 "-o", str(target)]) == 0
    layout = Session(out).layout
    again, original = read_adapter_file(target, layout), read_adapter_file(out / "adapters" / "pre5.onnx_adapter",
                                                                           layout)
    assert all(np.array_equal(again[k], original[k]) for k in original)  # the mask from its prefix_length too
    inputs, expected = references["pre5"]
    assert np.abs(Session(out).run(inputs, adapter=target)["last_hidden_state"] - expected[0]).max() < 1e-5


@pytest.mark.slow
def test_a_prefix_file_for_another_layout_is_refused(compiled, tmp_path):
    out, references = compiled
    session = Session(out)
    layout = session.layout
    # The same adapters with the shared prefix slot compiled for prefixes up to 6 instead of 8: other shapes.
    shorter = Layout([Tensor(t.name, (6, *t.shape[1:]) if t.adapter == "prefix_tuning_slot" and t.shape[0] == 8
                             else t.shape, t.dtype, t.adapter, t.module, t.key, t.identity)
                      for t in layout.tensors], layout.model_class)
    values = {t.name: t.identity_value() for t in shorter.tensors}
    write_adapter_file(tmp_path / "shorter.onnx_adapter", shorter, values)
    with pytest.raises(UserError, match="another model or adapter layout"):
        session.run(references["pre5"][0], adapter=tmp_path / "shorter.onnx_adapter")
    # Plain ONNX Runtime catches the shape itself.
    plain = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "shorter.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    with pytest.raises(Exception):  # noqa: B017 - ORT raises its own (pybind) error types
        plain.run(None, {k: v.numpy() for k, v in references["pre5"][0].items()}, options)


@pytest.mark.parametrize("attend, old, expected_prefix", [
    (0.0, torch.tensor([[0.0, -1e9, 0.0]]), [0.0, MASKED]),  # additive: 0 = attend
    (True, torch.tensor([[True, False, True]]), [True, False]),  # sdpa's bool mask: True = attend
    (False, torch.tensor([[False, True, False]]), [False, True]),  # masked_fill's: True = masked
])
def test_the_slot_mask_joins_a_mask_of_each_form(attend, old, expected_prefix):
    from torch import fx, nn

    from fxadapt.graph_edit import Emitter
    from fxadapt.methods.prefix_tuning import slot

    graph = fx.Graph()
    mask = graph.placeholder("mask")
    graph.output(mask)
    gm = fx.GraphModule(nn.Module(), graph)
    gm.add_submodule("pool", nn.Module())
    gm.pool.register_buffer(MASK_KEY, torch.tensor([0.0, MASKED]))  # a prefix of 1 in a slot of 2
    em = Emitter(gm, mask, {"pass": "test"})
    joined = slot._joined(em, mask, 2, attend, slot._mask(em, "pool"), old.dtype)
    gm.graph.output_node().args = (joined,)
    gm.recompile()
    got = gm(old.expand(2, 3))  # two query rows: the prefix columns broadcast over them
    assert got.dtype == old.dtype and got.shape == (2, 5)
    assert got[:, :2].tolist() == [expected_prefix] * 2 and torch.equal(got[:, 2:], old.expand(2, 3))
