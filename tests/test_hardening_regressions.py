"""Regression tests for every failure class of issue #13's audit: the audit's inputs exit 2 with one paragraph
and no traceback (or exit 0 where they are valid), hostile checkpoint configs are refused before anything is
allocated, regex targets run under a bound, and nothing is written on failure or outside the target."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import signal
import time
from pathlib import Path

import pytest

import fxadapt
from conftest import REFERENCE
from fxadapt.cli import main
from fxadapt.errors import UserError

BERT = REFERENCE / "models" / "bert"
CASES = REFERENCE / "cases"
LORA = CASES / "bert__lora_qv" / "adapter"
SEQ_BN = CASES / "bert__seq_bn" / "adapter"
PEFT = CASES / "bert__peft_lora" / "adapter"
FUSION = CASES / "bert__fuse"


@contextlib.contextmanager
def bounded(seconds: int = 30, extra_bytes: int = 2 << 30):
    """Fail (instead of hanging or taking the shared machine's memory) if the body runs longer than `seconds` or
    would grow the address space by more than `extra_bytes`: a regression of the before-allocation checks must
    show as a failed test, never as gigabytes allocated."""
    def too_slow(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra_bytes, hard))
    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _compile(capsys, tmp_path: Path, spec: Path | dict | bytes, model: Path = BERT) -> tuple[int, str, Path]:
    if not isinstance(spec, Path):
        path = tmp_path / "spec.json"
        path.write_bytes(spec if isinstance(spec, bytes) else json.dumps(spec).encode())
        spec = path
    out = tmp_path / "deep" / "out"
    with bounded():
        code = main(["compile", str(model), "--spec", str(spec), "-o", str(out), "--format", "onnx"])
    return code, " ".join(capsys.readouterr().err.split()), out


def _assert_refused(code: int, err: str, out: Path, *phrases: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for phrase in phrases:
        assert phrase in err, err
    assert not out.parent.exists(), "a failed compile created OUT's parent directories"


def _checkpoint(tmp_path: Path, source: Path, change: dict | None = None, raw: bytes | None = None) -> Path:
    """A copy of a fixture checkpoint with its adapter_config.json changed (`config` keys for AdapterHub, top-level
    keys for PEFT) or replaced by `raw` bytes."""
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    config_file = directory / "adapter_config.json"
    if raw is not None:
        config_file.write_bytes(raw)
    elif change is not None:
        data = json.loads(config_file.read_text())
        (data["config"] if "config" in data else data).update(change)
        config_file.write_text(json.dumps(data))  # json.dumps writes NaN as the bare token NaN, as an attacker would
    return directory


NAN = float("nan")

# id, spec (the "adapters" entry "a" unless it is a whole spec), message phrases
SPEC_CASES = [
    ("optimize_list", {"adapters": {"a": "lora"}, "optimize": ["merge_lora"]}, ["$.optimize"]),
    ("load_not_a_string", {"adapters": {"a": {"load": 5}}}, ["$.adapters.a.load"]),
    ("string_dropout", {"adapters": {"a": {"config": "seq_bn", "dropout": "x"}}}, ["dropout"]),
    ("string_dropout_in_config_string", {"adapters": {"a": "lora[dropout='x']"}}, ["dropout"]),
    ("non_string_non_linearity", {"adapters": {"a": {"config": "seq_bn", "non_linearity": 5}}}, ["non_linearity"]),
    ("leave_out_string", {"adapters": {"a": {"config": "lora", "leave_out": "0"}}}, ["leave_out"]),
    ("leave_out_string_items", {"adapters": {"a": {"config": "lora", "leave_out": ["0"]}}}, ["leave_out"]),
    ("dunder_name", {"adapters": {"__init__": "lora"}}, ["dunder"]),
    ("separator_name", {"adapters": {"../x": "lora"}}, ["path separator"]),
    ("split_beyond_positions", {"adapters": {"a": "seq_bn", "b": "seq_bn"},
                                "active": {"split": ["a", "b"], "splits": [1000, 1000]}}, ["splits", "64"]),
    ("spec_not_utf8", b'{"adapters": {"a": "lora"}, "description": "\xff\xfe"}', ["UTF-8"]),
    ("spec_nested_deep", b'{"adapters": {"a": "lora"}, "description": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     ["nested"]),
    ("spec_giant_integer", b'{"adapters": {"a": "lora[r=4]"}, "description": ' + b"9" * 5000 + b"}", ["digits"]),
    ("giant_integer_in_config", b'{"adapters": {"a": {"config": "lora", "r": ' + b"9" * 5000 + b"}}}", ["digits"]),
    ("alpha_nan_in_spec", b'{"adapters": {"a": {"config": "lora", "alpha": NaN}}}', ["NaN"]),
    ("average_nan_weights", b'{"adapters": {"a": "lora", "b": "lora"}, '
                            b'"active": {"average": ["a", "b"], "weights": [NaN, 1]}}', ["NaN"]),
    ("average_inf_weights", b'{"adapters": {"a": "lora", "b": "lora"}, '
                            b'"active": {"average": ["a", "b"], "weights": [Infinity, 1]}}', ["Infinity"]),
    ("average_overflowing_weights", {"adapters": {"a": "lora", "b": "lora"},
                                     "active": {"average": ["a", "b"], "weights": [1e308, 1e308]}}, ["finite"]),
    ("average_string_normalize", {"adapters": {"a": "lora", "b": "lora"},
                                  "active": {"average": ["a", "b"], "weights": [1, 2], "normalize_weights": "no"}},
     ["normalize_weights"]),
    ("fusion_load_not_a_string", {"adapters": {"a": "seq_bn", "b": "seq_bn"}, "active": {"fuse": ["a", "b"]},
                                  "fusions": [{"load": ["x"]}]}, ["$.fusions[0].load"]),
    ("fusion_string_dropout", {"adapters": {"a": "seq_bn", "b": "seq_bn"}, "active": {"fuse": ["a", "b"]},
                               "fusions": [{"adapters": ["a", "b"], "config": {"dropout_prob": "x"}}]},
     ["dropout_prob"]),
]


@pytest.mark.parametrize("spec, phrases", [pytest.param(s, p, id=i) for i, s, p in SPEC_CASES])
def test_bad_specs_exit_2(capsys, tmp_path, spec, phrases):
    _assert_refused(*_compile(capsys, tmp_path, spec), *phrases)


# id, source checkpoint, adapter_config change (or raw bytes), phrases. r / rank_pattern / reduction_factor would
# allocate 4 GB to 4 TB if built before the check against the checkpoint's tensor shapes.
CHECKPOINT_CASES = [
    ("config_not_utf8", LORA, b"\xff\xfe{}", ["not UTF-8"]),
    ("config_nested_deep", LORA, b"[" * 100_000 + b"]" * 100_000, ["nested too deeply|corrupt"]),
    ("config_giant_integer", LORA, b'{"config": {"r": ' + b"9" * 5000 + b"}}", ["cannot be read"]),
    ("lora_r_huge", LORA, {"r": 10**9}, ["disagree with its tensors"]),
    ("seq_bn_tiny_reduction_factor", SEQ_BN, {"reduction_factor": 1e-7}, ["disagree with its tensors"]),
    ("peft_r_huge", PEFT, {"r": 10**9}, ["disagree with its tensors"]),
    ("peft_rank_pattern_huge", PEFT, {"rank_pattern": {"query": 10**9}}, ["disagree with its tensors"]),
    ("lora_alpha_nan", LORA, {"alpha": NAN}, ["NaN"]),
    ("peft_alpha_nan", PEFT, {"lora_alpha": NAN}, ["NaN"]),
    ("peft_target_regex_backtracking", PEFT, {"target_modules": r"(\w+\.?)*Z"}, ["match no linear layer"]),
    ("peft_layers_pattern_backtracking", PEFT, {"layers_to_transform": [0], "target_modules": ["query"],
                                                "layers_pattern": r"(\w+\.?)*Z"}, ["match no linear layer"]),
]


@pytest.mark.parametrize("source, change, phrases", [pytest.param(s, c, p, id=i) for i, s, c, p in CHECKPOINT_CASES])
def test_hostile_checkpoint_configs_exit_2(capsys, tmp_path, source, change, phrases):
    directory = _checkpoint(tmp_path, source, **({"raw": change} if isinstance(change, bytes) else {"change": change}))
    start = time.perf_counter()
    code, err, out = _compile(capsys, tmp_path, {"adapters": {"a": {"load": str(directory)}}})
    assert code == 2, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for phrase in phrases:
        assert re.search(phrase, err), err
    assert not out.parent.exists()
    assert time.perf_counter() - start < 30, "a regex or an allocation was not bounded"


def test_a_hostile_checkpoint_composed_with_a_fresh_adapter_is_refused_before_allocation(capsys, tmp_path):
    directory = _checkpoint(tmp_path, SEQ_BN, change={"reduction_factor": 1e-7})
    spec = {"adapters": {"a": {"load": str(directory)}, "b": "seq_bn"}, "active": {"stack": ["a", "b"]}}
    _assert_refused(*_compile(capsys, tmp_path, spec), "disagree with its tensors")


@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_non_finite_checkpoint_weights_exit_2_not_3(capsys, tmp_path, bad):
    import torch

    directory = _checkpoint(tmp_path, LORA)
    weights = torch.load(directory / "pytorch_adapter.bin", weights_only=True)
    key = sorted(weights)[0]
    weights[key].view(-1)[0] = bad
    torch.save(weights, directory / "pytorch_adapter.bin")
    _assert_refused(*_compile(capsys, tmp_path, {"adapters": {"a": {"load": str(directory)}}}), "NaN or Inf")


@pytest.mark.slow
def test_valid_checkpoints_still_compile_under_the_allocation_bound(capsys, tmp_path):
    """The bound must not refuse honest checkpoints: a composition of two loaded adapters and a loaded fusion."""
    spec = {"adapters": {"a": {"load": str(FUSION / "adapter_a")}, "b": {"load": str(FUSION / "adapter_b")}},
            "active": {"fuse": ["a", "b"]}, "fusions": [{"load": str(FUSION / "fusion_a_b")}]}
    code, err, out = _compile(capsys, tmp_path, spec)
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["spec"]["adapters"]["a"]["method"] == "bottleneck"


def test_a_model_whose_pickle_torch_refuses_exits_2_without_advising_weights_only_off(capsys, tmp_path):
    import collections
    import datetime

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(BERT / "config.json", model)
    weights = collections.OrderedDict(load_file(str(BERT / "model.safetensors")))
    weights["extra"] = datetime.date(2020, 1, 1)  # a global torch's weights_only unpickler does not allow
    torch.save(weights, model / "pytorch_model.bin")
    code, err, out = _compile(capsys, tmp_path, {"adapters": {"a": "lora"}}, model=model)
    _assert_refused(code, err, out, "safetensors")
    assert "weights_only" not in err


@pytest.mark.parametrize("source, change", [(LORA, {"r": 10**9}), (SEQ_BN, {"reduction_factor": 1e-7}),
                                            (PEFT, {"rank_pattern": {"value": 10**9}})])
def test_load_adapter_checks_sizes_before_allocating(model, tmp_path, source, change):
    directory = _checkpoint(tmp_path, source, change=change)
    with bounded(), pytest.raises(UserError, match="disagree with its tensors"):
        model.load_adapter(directory, load_as="b")
    assert "b" not in model.adapters


@pytest.mark.parametrize("source", [LORA, SEQ_BN, PEFT])
def test_honest_checkpoints_load_under_the_allocation_bound(model, source):
    with bounded():
        assert model.load_adapter(source, load_as="ok") == "ok"


def test_a_backtracking_exclude_regex_that_excludes_nothing_is_valid(model, tmp_path):
    """`re` would take forever to find that `(\\w+\\.?)*Z` matches no module name; bounded, the load is exit-0 valid."""
    directory = _checkpoint(tmp_path, PEFT, change={"exclude_modules": r"(\w+\.?)*Z"})
    with bounded(seconds=20):
        assert model.load_adapter(directory, load_as="ok") == "ok"
    assert len(model.adapter_modules("ok")) == 4  # query and value in both layers: nothing was excluded


def test_a_checkpoint_name_outside_the_target_is_refused(model, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(LORA, directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    config["name"] = "../../escaped"
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="path separator"):
        model.load_adapter(directory)
    assert not model.adapters
    model.add_adapter("kept", "lora")
    (tmp_path / "all").mkdir()
    (tmp_path / "all" / "notes.txt").write_text("mine")
    model.save_all_adapters(tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["kept", "notes.txt"]
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("name", ["__init__", "../x", "a/b", "x" * 200], ids=["dunder", "dotdot", "slash", "long"])
def test_add_adapter_refuses_names_that_shadow_or_escape(model, name):
    with pytest.raises(UserError, match="adapter name"):
        model.add_adapter(name, "lora")


@pytest.mark.parametrize("weights", [[NAN, 1.0], [float("inf"), 1.0], [1e308, 1e308]])
def test_average_refuses_non_finite_weights_in_python(weights):
    with pytest.raises(UserError, match="finite"):
        fxadapt.Average("a", "b", weights=weights)


def test_save_adapter_fusion_keeps_unrelated_files(model, tmp_path):
    model.add_adapter("a", "seq_bn")
    model.add_adapter("b", "seq_bn")
    model.add_adapter_fusion(fxadapt.Fuse("a", "b"))
    target = tmp_path / "fusion"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    model.save_adapter_fusion(target, "a,b")
    model.save_adapter(target, "a")  # a second layout into the same directory keeps the first's files
    names = {p.name for p in target.iterdir()}
    assert {"notes.txt", "adapter_fusion_config.json", "adapter_config.json"} <= names, names
    assert (target / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content, phrase", [(b"\xff\xfe{}", "not UTF-8"),
                                             (b"[" * 100_000, "nested too deeply|corrupt"),
                                             (b'{"config": {"temperature": NaN}}', "NaN")],
                         ids=["not_utf8", "nested_deep", "nan_token"])
def test_unreadable_fusion_configs_exit_2(capsys, tmp_path, content, phrase):
    fusion = tmp_path / "fusion"
    shutil.copytree(FUSION / "fusion_a_b", fusion)
    (fusion / "adapter_fusion_config.json").write_bytes(content)
    spec = {"adapters": {"a": {"load": str(FUSION / "adapter_a")}, "b": {"load": str(FUSION / "adapter_b")}},
            "active": {"fuse": ["a", "b"]}, "fusions": [{"load": str(fusion)}]}
    code, err, out = _compile(capsys, tmp_path, spec)
    assert code == 2 and re.search(phrase, err) and "Traceback" not in err, err
    assert not out.parent.exists()


def test_a_writable_out_in_a_read_only_parent_is_published_into(tmp_path, monkeypatch):
    """The audit's container setup: OUT is a writable mount in a read-only parent; staging inside OUT needs
    nothing from the parent."""
    import os

    from fxadapt import publish

    out = tmp_path / "out"
    out.mkdir()
    real = os.access
    monkeypatch.setattr(publish.os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    with (publication := publish.Publication(out)) as staging:
        (staging / "report.json").write_text("{}")
        publication.commit()
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
