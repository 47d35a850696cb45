"""`fxadapt compile` publishes through fxadapt/publish.py: a SIGTERM mid-compile leaves nothing, a symlink at
an artifact's path is replaced (its target untouched), and report.json is strict JSON."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from conftest import REFERENCE
from fxadapt import pipeline
from fxadapt.cli import main

BERT_DIR = REFERENCE / "models" / "bert"


@pytest.mark.slow
def test_sigterm_mid_compile_leaves_no_output_and_no_staging(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "lora"}}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fxadapt.cli", "compile", str(BERT_DIR), "--spec", str(spec),
                             "-o", str(out), "--format", "onnx"], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(".fxadapt-stage-" in p.name for p in tmp_path.iterdir()):  # the build has started
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


@pytest.mark.slow
def test_a_symlink_at_an_artifact_path_is_replaced_not_followed(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"adapters": {"a": "lora"}}))
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.onnx"
    victim.write_text("precious")
    (out / "model.onnx").symlink_to(victim)
    (out / "notes.txt").write_text("mine")
    assert main(["compile", str(BERT_DIR), "--spec", str(spec), "-o", str(out), "--format", "onnx"]) == 0
    assert victim.read_text() == "precious" and not (out / "model.onnx").is_symlink()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "report.json").read_text())["ok"] is True


def test_report_json_is_strict_json(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "report_json", lambda *a: {"error": math.nan, "nested": [math.inf, 1.5]})
    pipeline._write_report(None, None, tmp_path, (1e-4, 1e-4))
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}")) == {
        "error": None, "nested": [None, 1.5]}


def test_sigterm_handler_is_restored_after_main(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["compile", str(BERT_DIR), "--spec", str(tmp_path / "missing.json"), "-o", str(tmp_path / "o")]) == 2
    assert signal.getsignal(signal.SIGTERM) == before
