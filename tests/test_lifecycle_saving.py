"""save_adapter / save_adapter_fusion write their own files into the target directory and nothing else:
unrelated files survive, stale files of the layout go, a failed save changes nothing, names cannot escape the
target, modes follow the umask, and the reference's default `.bin` files are written beside the safetensors."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import fxadapt
from conftest import REFERENCE
from fxadapt.checkpoints import adapterhub
from fxadapt.checkpoints.writer import STAGING_PREFIX
from fxadapt.errors import UserError

BERT = REFERENCE / "models" / "bert"


def _out(model):
    with torch.no_grad():
        return model(**model.captured.inputs(2, 5, seed=1)).last_hidden_state


def _perturb(model, name):
    with torch.no_grad():
        for module in model.adapter_modules(name):
            for param in module.parameters():
                param.add_(torch.randn_like(param) * 0.1)


def test_save_keeps_unrelated_files_and_writes_the_reference_default_bin(model, captured, tmp_path):
    model.add_adapter("a", "lora[r=4,alpha=8]", set_active=True)
    _perturb(model, "a")
    target = tmp_path / "a"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "data").mkdir()
    (target / "data" / "x.csv").write_text("1,2")
    model.save_adapter(target, "a")
    assert (target / "notes.txt").read_text() == "mine" and (target / "data" / "x.csv").read_text() == "1,2"
    safe = adapterhub.read_weights(target, "t", ("adapter.safetensors",))
    pickled = torch.load(target / "pytorch_adapter.bin", weights_only=True)
    assert safe.keys() == pickled.keys() and all(torch.equal(safe[k], pickled[k]) for k in safe)
    assert not [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX)]
    # Only the .bin (as the reference's default save writes it) still loads, with the same outputs.
    (target / "adapter.safetensors").unlink()
    fresh = fxadapt.AdaptedModel(*captured)
    fresh.load_adapter(target, set_active=True)
    assert torch.equal(_out(fresh), _out(model))


def test_a_later_save_removes_stale_files_of_the_layout_only(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    model.add_classification_head("a", num_labels=2)
    target = tmp_path / "a"
    model.save_adapter(target, "a")
    (target / "keep.json").write_text("{}")
    (target / "head_config.json").write_text("{}")  # as if an earlier save had a head
    (target / "pytorch_model_head.bin").write_bytes(b"old")
    model.save_adapter(target, "a", with_head=False)
    names = {p.name for p in target.iterdir()}
    assert "keep.json" in names and "head_config.json" not in names and "pytorch_model_head.bin" not in names


def test_a_failed_save_into_a_new_directory_creates_nothing(model, tmp_path, monkeypatch):
    model.add_adapter("a", "seq_bn")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapterhub, "save_file", broken)
    with pytest.raises(UserError, match="previous files are unchanged"):
        model.save_adapter(tmp_path / "new" / "deeper" / "a", "a")
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_target_file_is_replaced_not_followed(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    target = tmp_path / "a"
    target.mkdir()
    (target / "adapter_config.json").symlink_to(outside)
    model.save_adapter(target, "a")
    assert outside.read_text() == "precious"
    assert not (target / "adapter_config.json").is_symlink()


def test_modes_follow_the_umask(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    old = os.umask(0o022)
    try:
        model.save_adapter(tmp_path / "a", "a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "adapter_config.json").stat().st_mode) == 0o644


def test_stale_staging_of_a_dead_process_is_swept(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    target = tmp_path / "a"
    stale = target / f"{STAGING_PREFIX}999999999-x"  # no such pid
    stale.mkdir(parents=True)
    (stale / "adapter.safetensors").write_bytes(b"half")
    model.save_adapter(target, "a")
    assert not stale.exists()


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a/b", "..", "__init__", "x" * 300, ""])
def test_bad_names_are_refused_where_they_enter(model, tmp_path, name):
    with pytest.raises(UserError, match="name"):
        model.add_adapter(name, "seq_bn")
    model.add_adapter("ok", "seq_bn")
    model.save_adapter(tmp_path / "ok", "ok")
    config = tmp_path / "ok" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "name": name or 5}))
    with pytest.raises(UserError, match="name"):
        model.load_adapter(tmp_path / "ok")
    assert list(model.adapters) == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # nothing written outside


def test_a_checkpoint_name_cannot_lead_save_all_adapters_outside(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    model.save_adapter(tmp_path / "src", "a")
    config = tmp_path / "src" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "name": "../escaped"}))
    with pytest.raises(UserError, match="path separator"):
        model.load_adapter(tmp_path / "src")
    model.save_all_adapters(tmp_path / "all")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all", "src"]
