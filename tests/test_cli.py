"""The CLI's happy paths: the README's default compile, `sites`, `inspect`, and AdapterHub save/load."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REFERENCE
from fxadapt.capture import flatten_outputs
from fxadapt.checkpoints import adapterhub
from fxadapt.cli import main
from fxadapt.pipeline import build
from fxadapt.spec import parse_spec


def test_compile_builtin_default_writes_verified_artifacts(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"s": "lora[r=4,alpha=8,init_weights='bert']"}, "active": "s"}))
    out = tmp_path / "out"
    # --debug: every pass is checked (the outputs after merge_lora and DCE equal the reference's)
    assert main(["compile", "--spec", str(spec), "-o", str(out), "--format", "all", "--debug"]) == 0
    printed = capsys.readouterr().out
    assert "[  ok] onnx" in printed and "[  ok] torchscript" in printed and "report" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["model"] == "builtin:tiny-bert"
    assert set(report["artifacts"]) == {"graph", "onnx", "torchscript", "pt2"}
    assert list(report["passes"]) == ["insert_adapters", "merge_lora", "eliminate_dead_code"]
    assert report["passes"]["merge_lora"] == 4 and report["passes"]["insert_adapters"] > 0
    assert {s["site"] for s in report["sites"]} == {"attn.q", "attn.v"}
    for name in ("model.onnx", "model.ts", "model.pt2"):
        assert (out / name).is_file()
    onnx_checks = report["artifacts"]["onnx"]["checks"]
    assert [c["shape"] for c in onnx_checks] == ["2x8", "3x5"]
    assert all(o["max_abs"] < 1e-5 for c in onnx_checks for o in c["outputs"].values())


@pytest.mark.slow
def test_compile_reports_lower_composition_under_its_own_name(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "seq_bn", "b": "seq_bn"}, "active": {"stack": ["a", "b"]}}))
    out = tmp_path / "out"
    assert main(["compile", "--spec", str(spec), "-o", str(out), "--format", "onnx", "--debug"]) == 0
    passes = json.loads((out / "report.json").read_text())["passes"]
    assert list(passes) == ["lower_composition", "merge_lora", "eliminate_dead_code"]
    assert passes["lower_composition"] > 0


@pytest.mark.slow
def test_verification_failure_exits_3_and_keeps_artifacts(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"s": "seq_bn"}}))
    out = tmp_path / "out"
    # An impossible tolerance: the export is correct but not bit-exact, so verification must fail.
    assert main(["compile", "--spec", str(spec), "-o", str(out), "--format", "onnx", "--atol", "0", "--rtol", "0"]) == 3
    assert "verification failed" in capsys.readouterr().err
    assert (out / "model.onnx").is_file() and not json.loads((out / "report.json").read_text())["ok"]


def test_sites_command(capsys):
    assert main(["sites", "builtin:tiny-gpt2"]) == 0
    printed = capsys.readouterr().out
    assert "attn.qkv" in printed and "fused q/k/v" in printed and "pre-LN" in printed


def test_inspect_text(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "lora"}}))
    assert main(["inspect", "--spec", str(spec), "--format", "text"]) == 0
    assert "lora" in capsys.readouterr().out


def test_adapterhub_save_then_load_reproduces_outputs(tmp_path):
    case = REFERENCE / "cases" / "distilbert__double_seq_bn" / "adapter"
    model = str(REFERENCE / "models" / "distilbert")
    spec = parse_spec({"adapters": {"a": {"load": str(case)}}})
    first = build(model, spec)
    placements = first.graph.meta["fxadapt"]["placements"]
    adapterhub.save(first.graph, placements, tmp_path / "saved", "a", spec.adapters["a"].config.to_dict(),
                    {"hidden_size": 32})
    second = build(model, parse_spec({"adapters": {"a": {"load": str(tmp_path / "saved")}}}))
    inputs = first.captured.inputs(2, 6)
    with torch.no_grad():
        for a, b in zip(flatten_outputs(first.graph(**inputs)), flatten_outputs(second.graph(**inputs)), strict=True):
            assert torch.equal(a, b)


def test_sites_command_with_a_composition_spec(capsys):
    from pathlib import Path

    spec = Path(__file__).parents[1] / "examples" / "composition.json"
    assert main(["sites", "--spec", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert "adapters at sites" in printed and "task_b" in printed and "residual.ffn     lang" in printed
