"""Untrusted checkpoints: every unreadable or hostile file is a UserError naming it, checked before anything
is allocated (issue #13): non-UTF-8 or absurdly nested JSON, giant integer literals, NaN/Inf weights, a head
config whose sizes disagree with its tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxadapt
from conftest import REFERENCE
from fxadapt.errors import UserError

BERT = REFERENCE / "models" / "bert"


@pytest.fixture
def saved(captured, tmp_path):
    """A fresh model and the directory of a saved seq_bn adapter with a classification head."""
    model = fxadapt.AdaptedModel(*captured)
    model.add_adapter("a", "seq_bn")
    model.add_classification_head("a", num_labels=3)
    model.save_adapter(tmp_path / "a", "a")
    model.delete_adapter("a")
    return model, tmp_path / "a"


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|corrupt"),
    (b'{"config": {"reduction_factor": ' + b"9" * 5000 + b"}}", "cannot be read"),
    (b"{not json", "corrupt"),
    (b"[1, 2]", "JSON object"),
])
def test_unreadable_adapter_configs_are_user_errors(saved, content, message):
    model, directory = saved
    (directory / "adapter_config.json").write_bytes(content)
    with pytest.raises(UserError, match=message):
        model.load_adapter(directory, load_as="b")
    assert "b" not in model.adapters


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(saved, bad):
    model, directory = saved
    tensors = load_file(str(directory / "adapter.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = bad
    save_file(tensors, str(directory / "adapter.safetensors"))
    with pytest.raises(UserError, match=f"{key}.*NaN or Inf"):
        model.load_adapter(directory, load_as="b")
    assert "b" not in model.adapters


def test_a_pickle_that_is_not_a_tensor_mapping_is_refused(saved):
    model, directory = saved
    (directory / "adapter.safetensors").unlink()
    torch.save([torch.zeros(2)], directory / "pytorch_adapter.bin")
    with pytest.raises(UserError, match="mapping of names to tensors"):
        model.load_adapter(directory, load_as="b")


@pytest.mark.parametrize("change", [{"num_labels": 10**9}, {"layers": 10**6}, {"num_labels": "3"}, {"layers": 0}])
def test_head_sizes_are_checked_against_the_tensors_before_allocation(saved, change):
    model, directory = saved
    head = json.loads((directory / "head_config.json").read_text())
    head["config"].update(change)
    (directory / "head_config.json").write_text(json.dumps(head))
    with pytest.raises(UserError, match="head"):
        model.load_adapter(directory, load_as="b")
    assert "b" not in model.adapters


def test_a_head_saved_only_as_the_reference_bin_loads(saved, captured):
    model, directory = saved
    (directory / "model_head.safetensors").unlink()
    name = model.load_adapter(directory, load_as="b")
    assert model.heads[name][-1].out_features == 3
