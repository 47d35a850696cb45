"""Bad input exits 2 with a one-paragraph message naming the problem, and leaves no partial output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import REFERENCE
from fxadapt.cli import main

LORA_CKPT = REFERENCE / "cases" / "bert__lora_qv" / "adapter"
BERT_DIR = REFERENCE / "models" / "bert"


def _run(capsys, tmp_path, spec, model=str(BERT_DIR), out=None):
    out = out or tmp_path / "out"
    code = main(["compile", model, "--spec", str(spec), "-o", str(out), "--format", "onnx"])
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped for the terminal
    return code, err, out


def _assert_clean_failure(code, err, out, *phrases):
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1
    for phrase in phrases:
        assert phrase in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".fxadapt-" in p.name], "staging directory left behind"


@pytest.mark.parametrize("text, phrases", [
    ('{"adapters": {"a": "lora"', ["malformed JSON", "line 1"]),
    ('{"adapters": {"a": "lorax"}}', ["$.adapters.a", "unknown adapter method 'lorax'"]),
    ('{"adapters": {"a": "lora[rank=4]"}}', ["$.adapters.a", "unknown lora config key(s) 'rank'"]),
    ('{"adapters": {"a": "lora[r=0]"}}', ["$.adapters.a.r", "positive"]),
    ('{"adapters": {"a": {"config": "seq_bn", "reduction_factor": 0}}}', ["reduction_factor", "> 0"]),
    ('{"adapters": {"a": "lora"}, "active": "b"}', ["$.active", "unknown adapter 'b'"]),
    ('{"adapters": {"a": "mtl_lora[n_up_projection=0]"}}', ["$.adapters.a.n_up_projection", "at least one"]),
    ('{"adapters": {"a": "lora"}, "colour": 1}', ["unknown spec key(s) 'colour'"]),
])
def test_bad_spec(capsys, tmp_path, write_spec, text, phrases):
    _assert_clean_failure(*_run(capsys, tmp_path, write_spec(text)), *phrases)


def test_missing_checkpoint(capsys, tmp_path, write_spec):
    spec = write_spec({"adapters": {"a": {"load": "does-not-exist"}}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec), "$.adapters.a.load", "does not exist")


@pytest.mark.slow
def test_corrupt_checkpoint(capsys, tmp_path, write_spec):
    broken = tmp_path / "broken"
    shutil.copytree(LORA_CKPT, broken)
    (broken / "pytorch_adapter.bin").write_bytes(b"not a checkpoint")
    spec = write_spec({"adapters": {"a": {"load": str(broken)}}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec), "corrupt")


def test_corrupt_checkpoint_config(capsys, tmp_path, write_spec):
    broken = tmp_path / "broken"
    shutil.copytree(LORA_CKPT, broken)
    (broken / "adapter_config.json").write_text("{oops")
    spec = write_spec({"adapters": {"a": {"load": str(broken)}}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec), "adapter_config.json is corrupt")


def test_checkpoint_for_another_hidden_size(capsys, tmp_path, write_spec):
    import transformers

    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                                     architectures=["BertModel"])
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert48")
    spec = write_spec({"adapters": {"a": {"load": str(LORA_CKPT)}}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec, model=str(tmp_path / "bert48")), "hidden size 32",
                          "hidden size is 48")


def test_checkpoint_for_another_architecture(capsys, tmp_path, write_spec):
    spec = write_spec({"adapters": {"a": {"load": str(REFERENCE / "cases" / "gpt2__seq_bn" / "adapter")}}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec), "lacks", "another model")


def test_model_without_matching_sites(capsys, tmp_path, write_spec):
    spec = write_spec({"adapters": {"a": "lora[attn_matrices=['k'],leave_out=[0,1]]"}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec), "no site for this lora adapter")


def test_missing_model(capsys, tmp_path, write_spec):
    spec = write_spec({"adapters": {"a": "lora"}})
    _assert_clean_failure(*_run(capsys, tmp_path, spec, model=str(tmp_path / "nope")), "no such directory")


def test_unwritable_output_dir(capsys, tmp_path, write_spec):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    spec = write_spec({"adapters": {"a": "lora"}})
    code, err, _ = _run(capsys, tmp_path, spec, out=blocker / "out")
    assert code == 2 and "choose a writable -o path" in err and "Traceback" not in err
    assert blocker.read_text() == "a file, not a directory"


def test_existing_output_is_kept_on_failure(capsys, tmp_path, write_spec):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"previous": True}))
    code, err, _ = _run(capsys, tmp_path, write_spec('{"adapters": {"a": "lora[r=-1]"}}'), out=out)
    assert code == 2
    assert json.loads((out / "report.json").read_text()) == {"previous": True}
