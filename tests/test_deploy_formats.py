"""Deployment artifacts beyond model.onnx (issue #12): --ort-optimize (model.opt.onnx, attention fused into
MultiHeadAttention), --quantize int8 (model.int8.onnx, judged by cosine), --format aoti, and a .pt2 that loads
in a process that imports only torch. One compile of the tiny reference BERT with a perturbed seq_bn checkpoint
(adapters 1.3.0) serves the fast tests; a hand-built attention chain is the fusion's negative case; adapter
weights turned into graph inputs stand in for --swappable (the optimizer and quantizer must not fold them)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import REFERENCE
from fxadapt.cli import main
from fxadapt.errors import UserError
from fxadapt.export import quantize as quantize_module
from fxadapt.export.onnx import run_onnx
from fxadapt.export.onnx_attention import fuse_attention
from fxadapt.export.ort_optimize import adapter_weights, optimize_onnx, overridable
from fxadapt.export.quantize import quantize_onnx, quantized_errors
from fxadapt.pipeline import compile_model
from fxadapt.spec import load_spec

BERT = REFERENCE / "models" / "bert"
CHECKPOINT = REFERENCE / "cases" / "bert__seq_bn" / "adapter"


def _spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"adapters": {"a": {"load": str(CHECKPOINT)}}, "active": "a"}))
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The tiny BERT with a perturbed seq_bn checkpoint, compiled to onnx + opt + int8 + pt2."""
    out = tmp_path_factory.mktemp("deploy")
    result = compile_model(str(BERT), load_spec(_spec(out)), out / "out", ("onnx", "pt2"), ort_optimize=True,
                           quantize="int8")
    return out / "out", result, json.loads((out / "out" / "report.json").read_text())


def _inputs(batch=3, seq=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # padding, so the fused attention's bias input matters
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=generator), "attention_mask": mask}


@pytest.mark.slow  # one BERT compile with --ort-optimize --quantize int8 (~10 s) for these four
def test_ort_optimize_fuses_attention_and_keeps_outputs_and_adapters(compiled):
    out, result, report = compiled
    entry = report["artifacts"]["onnx_opt"]
    layers = result.captured.config.num_hidden_layers
    assert entry["ok"] and entry["path"] == "model.opt.onnx" and entry["model_type"] == "bert"
    assert entry["ort_optimize"]["MultiHeadAttention"] == layers
    assert entry["ort_optimize"]["SkipLayerNormalization"] >= layers
    assert {c["shape"] for c in entry["checks"]} == {c["shape"] for c in report["artifacts"]["onnx"]["checks"]}
    optimized = onnx.load(str(out / "model.opt.onnx"))
    assert not [n for n in optimized.graph.node if n.op_type == "Softmax"]
    assert entry["adapter_weights"] == len(adapter_weights(onnx.load(str(out / "model.onnx")))) > 0
    # The adapter survived: outputs match the adapted graph and differ from the base model's.
    import transformers  # only this check needs the eager base model

    inputs = _inputs()
    base = transformers.BertModel.from_pretrained(str(BERT)).eval()
    with torch.no_grad():
        adapted = result.graph(**inputs)["last_hidden_state"]
        plain = base(**inputs).last_hidden_state
    got = torch.from_numpy(run_onnx(out / "model.opt.onnx", inputs)[0])
    assert torch.allclose(got, adapted, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2


@pytest.mark.slow  # one BERT compile with --ort-optimize --quantize int8 (~10 s) for these four
def test_int8_is_reported_by_cosine_and_quantizes_matmuls(compiled):
    out, _, report = compiled
    entry = report["artifacts"]["onnx_int8"]
    assert entry["ok"] and entry["source"] == "model.opt.onnx" and entry["quantized_matmuls"] > 0
    for check in entry["checks"]:
        for name, error in check["outputs"].items():
            assert 0.99 <= error["cosine"] <= 1.0 + 1e-9, name
            assert 0.0 < error["max_abs"] < 1.0, name  # int8 rounding moves the outputs, a little
    assert any(n.op_type == "MultiHeadAttention" for n in onnx.load(str(out / "model.int8.onnx")).graph.node)


def test_quantized_errors_fail_below_the_cosine_tolerance():
    reference = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0])]
    errors = quantized_errors(["a", "b"], reference, [np.array([1.0, 2.1, 2.9]), np.array([0.0, 1.0])])
    assert errors[0].ok and errors[0].cosine > 0.99 and errors[0].to_json()["min_cosine"] == 0.99
    assert not errors[1].ok and abs(errors[1].cosine) < 1e-12


@pytest.mark.slow  # one BERT compile with --ort-optimize --quantize int8 (~10 s) for these four
def test_pt2_loads_in_a_process_that_imports_only_torch(compiled, tmp_path):
    out, result, _ = compiled
    inputs = _inputs(2, 5)
    torch.save(inputs, tmp_path / "inputs.pt")
    code = ("import sys, torch\n"
            f"m = torch.export.load({str(out / 'model.pt2')!r}).module()\n"
            f"out = m(**torch.load({str(tmp_path / 'inputs.pt')!r}))\n"
            "assert not any(k.startswith('transformers') for k in sys.modules), 'transformers was imported'\n"
            f"torch.save(dict(out), {str(tmp_path / 'out.pt')!r})\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        expected = result.graph(**inputs)
    assert list(got) == result.captured.output_names
    for name in got:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def _as_inputs(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """`model` with the initializers `names` also declared as graph inputs: what --swappable writes."""
    for init in model.graph.initializer:
        if init.name in names:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


@pytest.mark.slow  # one BERT compile with --ort-optimize --quantize int8 (~10 s) for these four
def test_optimizer_and_quantizer_keep_adapter_inputs_overridable(compiled, tmp_path):
    out, result, _ = compiled
    model = onnx.load(str(out / "model.onnx"))
    weights = adapter_weights(model)  # by name the export keeps the biases (weights become transposed constants)
    assert weights
    swappable = tmp_path / "swappable.onnx"
    onnx.save(_as_inputs(model, weights), str(swappable))
    info = optimize_onnx(swappable, tmp_path / "opt.onnx", result.captured.config)
    assert info["ort_optimize"]["MultiHeadAttention"] == result.captured.config.num_hidden_layers
    quantize_onnx(tmp_path / "opt.onnx", tmp_path / "int8.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inputs = _inputs(2, 6)
    other = {n: (np.random.default_rng(0).standard_normal(inits[n].shape) * 0.3).astype(np.float32) for n in weights}
    import onnxruntime as ort  # native runtime, as in export/onnx.py

    def run(path, feed_weights):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {**{k: v.numpy() for k, v in inputs.items()}, **feed_weights})[0]

    for path in (tmp_path / "opt.onnx", tmp_path / "int8.onnx"):
        assert weights <= overridable(onnx.load(str(path))), path.name
    swapped, default = run(swappable, other), run(swappable, {})
    assert np.abs(swapped - default).max() > 1e-2  # the fed values matter
    assert np.abs(run(tmp_path / "opt.onnx", other) - swapped).max() < 1e-4
    int8 = run(tmp_path / "int8.onnx", other).ravel()
    assert float(np.dot(int8, swapped.ravel()) / np.linalg.norm(int8) / np.linalg.norm(swapped)) > 0.99


def _attention_chain(head_split: bool, flat: bool = False) -> onnx.ModelProto:
    """Softmax(Q·Kᵀ·c + bias)·V from [B,S,32] projections (head_split) or from ready [B,4,S,8] heads, merged
    back into [B,S,32] or (flat, as GPT-2 before its Gemm) [B·S,32]."""
    names = ["q", "k", "v"]
    shape = ["B", "S", 32] if head_split else ["B", 4, "S", 8]
    nodes, inits = [], [numpy_helper.from_array(np.array([0, 0, 4, 8], np.int64), "heads"),
                        numpy_helper.from_array(np.array([-1, 32] if flat else [0, 0, 32], np.int64), "merged"),
                        numpy_helper.from_array(np.array(8 ** -0.5, np.float32), "c")]
    for name in names:
        if head_split:
            nodes += [helper.make_node("Reshape", [name, "heads"], [name + "_r"]),
                      helper.make_node("Transpose", [name + "_r"], [name + "4"], perm=[0, 2, 1, 3])]
        else:
            nodes.append(helper.make_node("Identity", [name], [name + "4"]))
    nodes += [helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("Mul", ["q4", "c"], ["qs"]),
              helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
              helper.make_node("Add", ["scores", "bias"], ["biased"]),
              helper.make_node("Softmax", ["biased"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v4"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["o_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o_t", "merged"], ["o"])]
    value_info = [helper.make_tensor_value_info(n + "4", TensorProto.FLOAT, ["B", 4, "S", 8]) for n in names]
    if head_split:
        value_info += [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in names]
        + [helper.make_tensor_value_info("bias", TensorProto.FLOAT, ["B", 1, "S", "S"])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["BS", 32] if flat else ["B", "S", 32])], inits,
        value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_attention_fusion_matches_the_chain_and_leaves_other_chains_alone():
    import onnxruntime as ort  # native runtime, as in export/onnx.py

    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((2, 5, 32)).astype(np.float32) for n in "qkv"}
    feed["bias"] = np.where(rng.random((2, 1, 5, 5)) < 0.3, np.float32(-3e38), np.float32(0)).astype(np.float32)
    model = _attention_chain(head_split=True)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert fuse_attention(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MultiHeadAttention"]
    got = ort.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    assert np.abs(got - expected).max() < 1e-5
    # Heads that were never split from [B, S, hidden] projections: MultiHeadAttention cannot take them.
    # Heads merged into [B·S, hidden] (GPT-2's Conv1D): MultiHeadAttention returns [B, S, hidden].
    for untouched in (_attention_chain(head_split=False), _attention_chain(head_split=True, flat=True)):
        before = [n.op_type for n in untouched.graph.node]
        assert fuse_attention(untouched) == 0 and [n.op_type for n in untouched.graph.node] == before


def test_ort_optimize_without_onnx_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="add onnx to --format"):
        compile_model(str(BERT), load_spec(_spec(tmp_path)), tmp_path / "out", ("pt2",), ort_optimize=True)
    assert main(["compile", str(BERT), "--spec", str(_spec(tmp_path)), "-o", str(tmp_path / "o"),
                 "--format", "torchscript", "--quantize", "int8"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_int8_below_the_cosine_tolerance_exits_3_and_keeps_the_artifact(tmp_path, monkeypatch):
    monkeypatch.setattr(quantize_module, "MIN_COSINE", 1.0)  # int8 rounding never reaches cosine 1 exactly
    code = main(["compile", str(BERT), "--spec", str(_spec(tmp_path)), "-o", str(tmp_path / "o"), "--format", "onnx",
                 "--quantize", "int8"])
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 3 and (tmp_path / "o" / "model.int8.onnx").exists()
    assert not report["artifacts"]["onnx_int8"]["ok"] and report["artifacts"]["onnx"]["ok"]


@pytest.mark.slow
def test_aoti_package_verifies_on_both_shapes_and_swaps_constants(tmp_path):
    from fxadapt.export.aoti import constant_names, load_aoti, swap_constants  # the compiler stack: slow import

    result = compile_model(str(BERT), load_spec(_spec(tmp_path)), tmp_path / "out", ("aoti",))
    checks = [c for c in result.checks if c.artifact == "aoti"]
    assert len(checks) == 2 and all(c.ok for c in checks)
    compiled = load_aoti(tmp_path / "out" / "model.aoti.pt2")
    up = next(n for n in constant_names(compiled) if n.endswith("adapter_up.weight"))
    inputs = _inputs(2, 6)
    before = compiled(**inputs)["last_hidden_state"]
    swap_constants(compiled, {up: torch.zeros_like(dict(result.graph.named_parameters())[up])})
    after = compiled(**inputs)["last_hidden_state"]
    with torch.no_grad():
        dict(result.graph.named_parameters())[up].zero_()
        expected = result.graph(**inputs)["last_hidden_state"]
    assert (before - after).abs().max() > 1e-3 and torch.allclose(after, expected, atol=1e-4)


@pytest.mark.slow
def test_swappable_adapter_files_work_on_the_optimized_and_int8_models(tmp_path):
    import onnxruntime as ort  # native runtime, as in export/onnx.py

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": {"load": str(CHECKPOINT)}, "b": "lora[r=4]"}, "active": "a"}))
    out = tmp_path / "out"
    assert main(["compile", str(BERT), "--spec", str(spec), "-o", str(out), "--format", "onnx", "--swappable",
                 "--ort-optimize", "--quantize", "int8"]) == 0
    feed = {k: v.numpy() for k, v in _inputs(2, 6).items()}
    options = ort.SessionOptions()
    options.log_severity_level = 3  # it warns about every initializer that is also an input: that is the point
    sessions = {name: ort.InferenceSession(str(out / name), options, providers=["CPUExecutionProvider"])
                for name in ("model.onnx", "model.opt.onnx", "model.int8.onnx")}
    outputs = {}
    for adapter in ("a", "b"):
        loaded = ort.LoraAdapter()
        loaded.Load(str(out / "adapters" / f"{adapter}.onnx_adapter"))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(loaded)
        got = {name: s.run(["last_hidden_state"], feed, run_options)[0] for name, s in sessions.items()}
        plain = got["model.onnx"]
        assert np.abs(got["model.opt.onnx"] - plain).max() < 1e-5, adapter
        int8 = got["model.int8.onnx"].ravel()
        assert np.dot(int8, plain.ravel()) / np.linalg.norm(int8) / np.linalg.norm(plain) > 0.99, adapter
        outputs[adapter] = plain
    assert np.abs(outputs["a"] - outputs["b"]).max() > 1e-2  # the files switch the adapter in one session


@pytest.mark.slow
@pytest.mark.parametrize("name, attention", [("tiny-distilbert", 2), ("tiny-gpt2", 0), ("tiny-llama", 0)])
def test_optimized_and_int8_artifacts_verify_beyond_bert(tmp_path, name, attention):
    """GPT-2 (the gpt2 optimizer crashes on the dynamo export: bert's fusions are used, and its heads are merged
    for a Gemm, so no attention fuses) and Llama (rotary embeddings: no attention fuses) still verify."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "lora[r=4]"}, "active": "a"}))
    result = compile_model(f"builtin:{name}", load_spec(spec), tmp_path / "out", ("onnx",), ort_optimize=True,
                           quantize="int8")
    assert result.ok and {c.artifact for c in result.checks} >= {"onnx_opt", "onnx_int8"}
    assert result.artifacts["onnx_opt"]["ort_optimize"].get("MultiHeadAttention", 0) == attention
