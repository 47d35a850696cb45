"""Swappable adapters (issue #12): one ONNX model, one adapter file per adapter, fxadapt.runtime, adapters export.

Fast tests use a hand-made ONNX model (y = x ⊙ w, w an adapter input with a default) and the file format;
the slow ones compile the tiny reference BERT once with seven adapters (a PEFT LoRA of rank 8 written here,
AdapterHub LoRAs of rank 4 and 8 with other alphas sharing one padded slot, two seq_bn of other sizes and
scalings sharing one, a gated seq_bn and a DoRA) and compare every adapter file with a compile of that adapter
alone, in plain ONNX Runtime code and through fxadapt.runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from conftest import REFERENCE
from fxadapt.checkpoints.loading import read_config
from fxadapt.cli import main
from fxadapt.errors import UserError
from fxadapt.export import slots, swappable
from fxadapt.export.adapter_files import Layout, Tensor, read_adapter_file, write_adapter_file, write_layout
from fxadapt.export.checkpoint_export import convert_checkpoint
from fxadapt.runtime import Session
from fxadapt.spec import parse_spec

CASES = REFERENCE / "cases"
BERT = str(REFERENCE / "models" / "bert")


# ---- fast: the file format and the runtime on a hand-made swappable model -------------------------------------

def _toy(out: Path, width: int = 4) -> Layout:
    """OUT/model.onnx: y = x * w with w an input defaulting to ones; OUT/adapters/layout.json; files a (w = 2)
    and b (w = 3)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    w = helper.make_tensor_value_info("toy.w", TensorProto.FLOAT, [width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "toy.w"], ["y"])], "toy", [x, w], [y],
                              [numpy_helper.from_array(np.ones(width, np.float32), "toy.w")])
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out / "model.onnx"))
    layout = Layout([Tensor("toy.w", (width,), "float32", "a", "toy", "w", 1.0)], "Toy",
                    {"a": {"method": "toy"}, "b": {"method": "toy"}}, "a")
    write_layout(layout, out)
    for name, value in (("a", 2.0), ("b", 3.0)):
        write_adapter_file(out / "adapters" / f"{name}.onnx_adapter", layout, {"toy.w": np.full(width, value, "f")})
    return layout


def test_adapter_file_round_trip_and_layout_id(tmp_path):
    layout = _toy(tmp_path)
    values = read_adapter_file(tmp_path / "adapters" / "b.onnx_adapter", layout)
    assert np.array_equal(values["toy.w"], np.full(4, 3.0, "f"))
    assert ort.AdapterFormat.read_adapter(str(tmp_path / "adapters" / "b.onnx_adapter")).get_model_version() \
        == layout.model_version
    other = Layout([Tensor("toy.w", (8,), "float32")], "Toy")
    assert other.model_version != layout.model_version  # another shape is another layout
    assert Layout.from_json(json.loads(json.dumps(layout.to_json())), "here").digest == layout.digest


@pytest.mark.parametrize("damage", ["truncated", "other_layout", "forged_wrong_shape", "missing_tensor", "edited"])
def test_wrong_adapter_files_are_refused(tmp_path, damage):
    layout = _toy(tmp_path / "out")
    bad = tmp_path / "bad.onnx_adapter"
    if damage == "truncated":
        bad.write_bytes((tmp_path / "out" / "adapters" / "a.onnx_adapter").read_bytes()[:60])
    elif damage == "other_layout":  # a file written for a model of another width (hidden size)
        wide = Layout([Tensor("toy.w", (8,), "float32", "a")], "Toy")
        write_adapter_file(bad, wide, {"toy.w": np.ones(8, "f")})
    else:  # the right layout id, wrong contents (written directly, as another tool could)
        adapter = ort.AdapterFormat()
        adapter.set_adapter_version(1)
        adapter.set_model_version(layout.model_version)
        contents = {"forged_wrong_shape": {"toy.w": np.ones(8, "f")}, "missing_tensor": {},
                    "edited": {"toy.w": np.ones(4, "f"), "toy.extra": np.ones(4, "f")}}[damage]
        adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in contents.items()})
        adapter.export_adapter(str(bad))
    with pytest.raises(UserError, match="adapter file"):
        read_adapter_file(bad, layout)
    session = Session(tmp_path / "out")
    with pytest.raises(UserError, match="adapter file"):
        session.run({"x": np.ones((1, 4), "f")}, adapter=bad)
    assert session.cached == 0  # nothing half-loaded stays behind


def test_runtime_swaps_adapters_per_run_with_a_bounded_cache(tmp_path):
    _toy(tmp_path)
    session = Session(tmp_path, cache_size=1)
    x = np.arange(8, dtype="f").reshape(2, 4)
    assert np.array_equal(session.run({"x": x})["y"], x)  # the defaults
    assert np.array_equal(session.run({"x": x}, adapter="a")["y"], 2 * x)
    assert np.array_equal(session.run({"x": torch.from_numpy(x)}, adapter="b")["y"], 3 * x)
    assert session.cached == 1  # `a` was dropped for `b`
    assert np.array_equal(session.run({"x": x}, adapter=tmp_path / "adapters" / "a.onnx_adapter")["y"], 2 * x)
    with pytest.raises(UserError, match="unknown adapter 'c'"):
        session.run({"x": x}, adapter="c")
    with pytest.raises(UserError, match="missing: x"):
        session.run({"input": x}, adapter="a")


def test_runtime_refuses_a_model_that_is_not_its_layout(tmp_path):
    _toy(tmp_path)
    _toy(tmp_path / "wide", width=8)
    shutil.copy(tmp_path / "wide" / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(UserError, match="does not match"):
        Session(tmp_path)
    with pytest.raises(UserError, match="not a swappable model"):
        Session(tmp_path / "adapters")


@pytest.mark.parametrize("value, match", [
    ({"p": "prefix_tuning[use_gating=True]", "b": "seq_bn"}, "not swappable: a gated prefix"),
    ({"t": "prompt_tuning", "b": "seq_bn"}, "not swappable: no prompt"),
    ({"g": "ia3[use_gating=True]"}, "gated"),
    ({"s": "seq_bn", "p": "par_bn"}, "handle the residual and LayerNorm differently"),
    ({"u": "lora|seq_bn", "s": "seq_bn"}, "union"),
    ({"p": "par_bn", "q": "par_bn[non_linearity='swish']"}, "parallel bottleneck"),
    ({"m": "mam", "l": "lora"}, "prefix_tuning member"),
])
def test_unswappable_methods_are_refused(value, match):
    spec = parse_spec({"adapters": value, "active": next(iter(value))})
    with pytest.raises(UserError, match=match):
        swappable.swappable_spec(spec)


def test_swappable_spec_inserts_every_adapter_unmerged():
    spec = parse_spec({"adapters": {"a": "lora", "b": "seq_bn"}, "active": "b"})
    compiled = swappable.swappable_spec(spec)
    assert compiled.active == ["bottleneck_slot", "lora_slot"] and compiled.setup is None  # the active one first
    assert compiled.optimize["merge_lora"] is False and compiled.optimize["fuse_parallel_branches"] is False
    with pytest.raises(UserError, match="one adapter"):
        swappable.swappable_spec(parse_spec({"adapters": {"a": "lora", "b": "lora"}, "active": {"stack": ["a", "b"]}}))


def test_adapters_of_one_kind_share_one_padded_slot():
    spec = parse_spec({"adapters": {"a": "lora[r=4,alpha=16]", "b": "lora[r=8,alpha=8]", "c": "lora[r=2,use_dora=True]",
                                    "s": "seq_bn", "t": "seq_bn[reduction_factor=4,scaling=2.0]",
                                    "p": "par_bn", "q": "par_bn[reduction_factor=4]",
                                    "k": {"config": "lora", "attn_matrices": ["k"]}},
                       "active": "t"})
    grouped = slots.group(spec)
    assert grouped.members == {"lora_slot": ["a", "b"], "c": ["c"], "bottleneck_slot": ["s", "t"],
                               "bottleneck_slot_": ["p", "q"], "lora_slot_": ["k"]}  # other sites: another slot
    lora, seq = grouped.compiled["lora_slot"].config, grouped.compiled["bottleneck_slot"].config
    assert (lora.r, lora.scaling) == (8, 1.0) and (seq.reduction_factor, seq.scaling) == (4, 1.0)
    assert grouped.compiled["c"] is spec.adapters["c"] and grouped.shared == {"lora_slot", "lora_slot_",
                                                                              "bottleneck_slot", "bottleneck_slot_"}
    with pytest.raises(UserError, match="differently \\(s, t: .*; p, q: "):  # slots named by their adapters
        swappable.swappable_spec(spec)
    compiled = swappable.swappable_spec(parse_spec({"adapters": {"p": "par_bn", "q": "par_bn[reduction_factor=4]"},
                                                    "active": "q"}))
    assert compiled.active == ["bottleneck_slot"]  # two par_bn of other sizes: one slot, no Stack


def test_pad_is_zeros_at_the_end_and_per_block():
    a = np.arange(6, dtype="f").reshape(2, 3)
    assert np.array_equal(slots.pad(a, (3, 4)), [[0, 1, 2, 0], [3, 4, 5, 0], [0, 0, 0, 0]])
    stacked = np.arange(4, dtype="f").reshape(4, 1)  # a fused q/v LoRA's A: rank 2 per block
    assert np.array_equal(slots.pad(stacked, (6, 1), blocks=2).ravel(), [0, 1, 0, 2, 3, 0])
    assert slots.pad(a, (1, 3)) is None  # larger than the slot: refused by the caller


class _Replace(torch.nn.Module):
    """Stands in for a DoRA module: called as (x, y, W, b), composition "replace"."""

    composition = "replace"

    def forward(self, x, y, weight, bias):
        return y


def test_dora_identity_magnitude_is_the_base_weights_row_norm():
    root = torch.nn.Module()
    root.weight = torch.nn.Parameter(torch.randn(4, 3))
    root.dora = _Replace()
    graph = torch.fx.Graph()
    x, weight = graph.placeholder("x"), graph.get_attr("weight")
    y = graph.call_function(torch.nn.functional.linear, (x, weight))
    graph.output(graph.call_module("dora", (x, y, weight, None)))
    gm = torch.fx.GraphModule(root, graph)
    m = slots.identity_value(gm, "dora", root.dora, "m.weight", torch.zeros(4, 1))
    assert torch.allclose(m.view(-1), torch.linalg.norm(root.weight, dim=1))
    factor = m.view(-1) / torch.linalg.norm(root.weight + 0, dim=1)  # DoRA's m / ||W + B A|| with B = 0
    assert torch.allclose(factor, torch.ones(4))
    assert not slots.identity_value(gm, "dora", root.dora, "lora_B", torch.ones(4, 2)).any()


def _peft_slot_layout() -> Layout:
    """The layout a rank-8 PEFT LoRA slot on query and value of the tiny BERT's two layers gets (written by hand:
    no compile), filled by adapter `p`."""
    config = read_config(CASES / "bert__peft_lora" / "adapter", "here")[1].to_dict()
    slot_config = {**config, "r": 8, "lora_alpha": 8}
    tensors = []
    for layer in range(2):
        for projection in ("query", "value"):
            module = f"encoder.layer.{layer}.attention.self.{projection}"
            path = f"peft_lora_slot.{module.replace('.', '_')}"
            tensors += [Tensor(f"{path}.lora_A.weight", (8, 32), "float32", "peft_lora_slot", module, "lora_A.weight"),
                        Tensor(f"{path}.lora_B.weight", (32, 8), "float32", "peft_lora_slot", module, "lora_B.weight")]
    return Layout(tensors, "BertModel", {"p": {"method": "peft_lora", "config": slot_config, "slot": "peft_lora_slot"}},
                  "p", "", {"peft_lora_slot": {"method": "peft_lora", "config": slot_config, "shared": True}})


def test_adapters_export_pads_a_smaller_rank_on_fewer_sites_and_refuses_a_larger_rank(tmp_path):
    layout = _peft_slot_layout()
    source = _peft_rank8(tmp_path / "r4", 4)  # rank 4, lora_alpha 8: scaling 2
    config = json.loads((source / "adapter_config.json").read_text())
    (source / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query"]}))
    weights = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if ".query." in k}, str(source / "adapter_model.safetensors"))
    slot, values = convert_checkpoint(source, layout)
    assert slot == "p"
    key = "base_model.model.encoder.layer.1.attention.self.query"
    a, b = values["peft_lora_slot.encoder_layer_1_attention_self_query.lora_A.weight"], \
        values["peft_lora_slot.encoder_layer_1_attention_self_query.lora_B.weight"]
    assert np.array_equal(a[:4], weights[f"{key}.lora_A.weight"].numpy()) and not a[4:].any()
    assert np.allclose(b[:, :4], 2 * weights[f"{key}.lora_B.weight"].numpy()) and not b[:, 4:].any()
    assert np.allclose(b @ a, 2 * (weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]).numpy(),
                       atol=1e-6)  # float32 products summed in another order
    assert not any(v.any() for n, v in values.items() if "value" in n)  # a site it lacks: the identity
    with pytest.raises(UserError, match="larger than the model's slot \\[8, 32\\]"):
        convert_checkpoint(_peft_rank8(tmp_path / "r16", 16), layout)


def test_compile_swappable_refusal_exits_2_and_writes_nothing(tmp_path, write_spec, capsys):
    spec = write_spec({"adapters": {"p": "prompt_tuning", "b": "seq_bn"}, "active": "b"})
    assert main(["compile", "--spec", str(spec), "-o", str(tmp_path / "out"), "--format", "onnx", "--swappable"]) == 2
    assert "not swappable" in " ".join(capsys.readouterr().err.split()) and not (tmp_path / "out").exists()


# ---- slow: the tiny BERT with three adapters --------------------------------------------------------------------

def _peft_rank8(directory: Path, rank: int = 8) -> Path:
    """A PEFT LoRA checkpoint of rank 8 (query, value) with random weights, in PEFT's file layout."""
    directory.mkdir(parents=True)
    config = json.loads((CASES / "bert__peft_lora" / "adapter" / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": rank, "lora_alpha": 2 * rank}))
    generator = torch.Generator().manual_seed(rank)
    weights = {}
    for layer in range(2):
        for projection in ("query", "value"):
            key = f"base_model.model.encoder.layer.{layer}.attention.self.{projection}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, 32, generator=generator) * 0.2
            weights[f"{key}.lora_B.weight"] = torch.randn(32, rank, generator=generator) * 0.2
    save_file(weights, str(directory / "adapter_model.safetensors"))
    return directory


ADAPTERS = ("peft8", "lora4", "lora8", "bn", "bn8", "bn_gated", "dora")
LORA8 = {"config": "lora", "r": 8, "alpha": 8, "attn_matrices": ["q", "k", "v"], "intermediate_lora": True,
         "output_lora": True, "init_weights": "bert"}  # lora4's sites, another rank and scaling: one slot


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(OUT, spec dict, {adapter: (inputs, reference outputs of the adapter compiled alone)})."""
    from fxadapt.capture import flatten_outputs  # heavy (transformers): only the slow tests compile
    from fxadapt.pipeline import build, verification_shapes

    root = tmp_path_factory.mktemp("swappable")
    spec = {"adapters": {"peft8": {"load": str(_peft_rank8(root / "peft8"))},
                         "lora4": {"load": str(CASES / "bert__lora_all" / "adapter")},
                         "lora8": LORA8,
                         "bn": {"load": str(CASES / "bert__seq_bn" / "adapter")},
                         "bn8": "seq_bn[reduction_factor=8,scaling=2.0]",
                         "bn_gated": {"load": str(CASES / "bert__seq_bn_gating" / "adapter")},
                         "dora": {"config": "lora", "r": 2, "use_dora": True, "init_weights": "bert"}},
            "active": "lora4"}
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "out"
    assert main(["compile", BERT, "--spec", str(root / "spec.json"), "-o", str(out), "--format", "onnx",
                 "--swappable"]) == 0
    references = {}
    for name in ADAPTERS:
        single = build(BERT, parse_spec({"adapters": {name: spec["adapters"][name]}, "active": name}))
        inputs = verification_shapes(single.captured)[1][1]  # the second shape (3x5): not the capture's
        with torch.no_grad():
            references[name] = (inputs, [t.numpy() for t in flatten_outputs(single.graph(**inputs))])
    return out, spec, references


@pytest.mark.slow
def test_each_adapter_file_gives_its_single_compile_in_plain_onnxruntime(compiled):
    out, _, references = compiled
    # Plain ONNX Runtime, no fxadapt: one session for every adapter.
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    outputs = {}
    for name in ADAPTERS:
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / "adapters" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        inputs, expected = references[name]
        outputs[name] = session.run(None, {k: v.numpy() for k, v in inputs.items()}, options)
        for got, want in zip(outputs[name], expected, strict=True):
            assert np.abs(got - want).max() < 1e-5, name
    assert np.abs(outputs["peft8"][0] - outputs["bn"][0]).max() > 1e-2  # the adapters do differ
    inputs, expected = references["lora4"]  # no adapter file: the spec's active adapter
    assert np.abs(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0] - expected[0]).max() < 1e-5
    layout = json.loads((out / "adapters" / "layout.json").read_text())
    assert layout["active"] == "lora4" and set(layout["adapters"]) == set(ADAPTERS)
    # One padded slot per kind: lora4 and lora8 share rank-8 tensors, bn and bn8 size-4 ones.
    assert {t["adapter"] for t in layout["tensors"]} == {"peft_lora_slot", "lora_slot", "bottleneck_slot",
                                                         "bottleneck_slot_", "dora"}
    shapes = {t["key"]: t["shape"] for t in layout["tensors"] if t["adapter"] == "lora_slot"}
    assert shapes["lora_A"] == [8, 32] and layout["adapters"]["lora4"]["slot"] == "lora_slot"
    assert any(t.get("identity_values") for t in layout["tensors"] if t["adapter"] == "dora")  # m = ||W||_row
    report = json.loads((out / "report.json").read_text())
    assert report["artifacts"]["adapters"]["files"]["bn"] == "adapters/bn.onnx_adapter"
    assert all(report["artifacts"][f"onnx+{name}"]["ok"] for name in ADAPTERS)


@pytest.mark.slow
def test_runtime_session_serves_every_adapter(compiled):
    out, _, references = compiled
    session = Session(out, cache_size=2)
    assert session.adapters == list(ADAPTERS) and session.active == "lora4"
    for name in (*ADAPTERS, "peft8"):
        inputs, expected = references[name]
        got = session.run(inputs, adapter=name)
        assert np.abs(got["last_hidden_state"] - expected[0]).max() < 1e-5, name
    assert session.cached == 2


@pytest.mark.slow
def test_wrong_files_for_the_compiled_model_are_refused(compiled, tmp_path):
    out, _, references = compiled
    session = Session(out)
    layout = session.layout
    wide = Layout([Tensor(t.name, tuple(48 if d == 32 else d for d in t.shape), t.dtype, t.adapter)
                   for t in layout.tensors], layout.model_class)  # the same adapters on a hidden size 48 model
    write_adapter_file(tmp_path / "wide.onnx_adapter", wide, {t.name: t.identity_value() for t in wide.tensors})
    (tmp_path / "cut.onnx_adapter").write_bytes((out / "adapters" / "bn.onnx_adapter").read_bytes()[:-100])
    fewer = Layout([t for t in layout.tensors if t.adapter != "bottleneck_slot"], layout.model_class)  # other slots
    write_adapter_file(tmp_path / "fewer.onnx_adapter", fewer, {t.name: t.identity_value() for t in fewer.tensors})
    inputs = references["bn"][0]
    for file in ("wide", "cut", "fewer"):
        with pytest.raises(UserError, match="adapter file"):
            session.run(inputs, adapter=tmp_path / f"{file}.onnx_adapter")


@pytest.mark.slow
def test_adapters_export_round_trip(compiled, tmp_path, capsys):
    out, spec, references = compiled
    target = out / "adapters" / "peft8_again.onnx_adapter"
    assert main(["adapters", "export", spec["adapters"]["peft8"]["load"], "-o", str(target)]) == 0
    assert "'peft8'" in capsys.readouterr().err
    layout = Session(out).layout
    again = read_adapter_file(target, layout)
    original = read_adapter_file(out / "adapters" / "peft8.onnx_adapter", layout)
    assert all(np.array_equal(again[k], original[k]) for k in original)
    bn_spec = tmp_path / "bn.json"
    bn_spec.write_text(json.dumps({"adapters": {"x": spec["adapters"]["bn"]}, "active": "x"}))
    bn_file = tmp_path / "bn.onnx_adapter"
    assert main(["adapters", "export", str(bn_spec), "--model-dir", str(out), "-o", str(bn_file)]) == 0
    inputs, expected = references["bn"]
    got = Session(out).run(inputs, adapter=bn_file)["last_hidden_state"]
    assert np.abs(got - expected[0]).max() < 1e-5
    # A checkpoint that fits no compiled adapter (the model has no (IA)^3), and one of a rank above the slot's.
    assert main(["adapters", "export", str(CASES / "bert__ia3" / "adapter"), "--model-dir", str(out),
                 "-o", str(tmp_path / "ia3.onnx_adapter")]) == 2
    assert main(["adapters", "export", str(_peft_rank8(tmp_path / "r16", 16)), "--model-dir", str(out),
                 "-o", str(tmp_path / "r16.onnx_adapter")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the CLI wraps messages at the terminal's width
    assert "fits no adapter" in err and "larger than the model's slot [8, 32]" in err
    assert not (tmp_path / "r16.onnx_adapter").exists()


@pytest.mark.slow
def test_a_smaller_rank_checkpoint_exports_into_the_padded_slot(compiled, tmp_path):
    """PEFT LoRA r4 (the reference fixture, other alpha) into the model's rank-8 PEFT slot: zero-padded, its
    scaling folded; the outputs are those of the r4 checkpoint compiled alone."""
    from fxadapt.capture import flatten_outputs  # heavy (transformers): as in the fixture
    from fxadapt.pipeline import build

    out, _, references = compiled
    checkpoint = CASES / "bert__peft_lora" / "adapter"
    assert main(["adapters", "export", str(checkpoint), "--model-dir", str(out),
                 "-o", str(tmp_path / "r4.onnx_adapter")]) == 0
    single = build(BERT, parse_spec({"adapters": {"r4": {"load": str(checkpoint)}}, "active": "r4"}))
    inputs = references["peft8"][0]
    with torch.no_grad():
        expected = flatten_outputs(single.graph(**inputs))[0].numpy()
    got = Session(out).run(inputs, adapter=tmp_path / "r4.onnx_adapter")["last_hidden_state"]
    assert np.abs(got - expected).max() < 1e-5
    assert np.abs(got - references["peft8"][1][0]).max() > 1e-3  # not the compiled r8 adapter
