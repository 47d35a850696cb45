"""`--format aoti --swappable` (issue #12, item 4): one AOTInductor package for all the spec's adapters, each
adapter file of OUT/adapters swapped into its constants (`fxadapt.runtime.AotiSession`, `load_constants`)
without recompiling. One compile of a one-layer BERT (the smallest model the sites hold: an AOTInductor compile
takes minutes on two shared cores) with two LoRA ranks sharing a padded slot and a seq_bn serves the slow tests;
the refusals need no compile."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fxadapt.cli import main
from fxadapt.errors import UserError
from fxadapt.export.adapter_files import Layout, Tensor, write_adapter_file
from fxadapt.runtime import AotiSession
from fxadapt.spec import parse_spec

ADAPTERS = ("lora4", "lora8", "bn")
SPEC = {"adapters": {"lora4": {"config": "lora", "r": 4, "alpha": 8, "init_weights": "bert"},
                     "lora8": {"config": "lora", "r": 8, "alpha": 8, "init_weights": "bert"},  # lora4's slot
                     "bn": "seq_bn[reduction_factor=4,scaling=2.0]"},
        "active": "lora4"}


def _one_layer_bert(directory):
    """A BERT of one layer (hidden size 32) saved like a Hugging Face model directory."""
    import transformers  # heavy: only the compile needs it

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(OUT, {adapter: (inputs, outputs of the adapter compiled alone)}): inputs of a shape the compile did not
    verify (batch 2, sequence 9)."""
    from fxadapt.capture import flatten_outputs  # heavy (transformers), as above
    from fxadapt.pipeline import build

    root = tmp_path_factory.mktemp("aoti_swappable")
    model = str(_one_layer_bert(root / "model"))
    (root / "spec.json").write_text(json.dumps(SPEC))
    out = root / "out"
    # The ONNX model beside the package: one set of adapter files serves both (one AOTInductor compile for the file).
    assert main(["compile", model, "--spec", str(root / "spec.json"), "-o", str(out), "--format", "onnx,aoti",
                 "--swappable"]) == 0
    generator = torch.Generator().manual_seed(3)
    inputs = {"input_ids": torch.randint(0, 100, (2, 9), generator=generator),
              "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    inputs["attention_mask"][1, 6:] = 0
    references = {}
    for name in ADAPTERS:
        single = build(model, parse_spec({"adapters": {name: SPEC["adapters"][name]}, "active": name}))
        with torch.no_grad():
            references[name] = (inputs, flatten_outputs(single.graph(**inputs)))
    return out, references


@pytest.mark.slow  # one AOTInductor compile (minutes on two shared cores) for the tests below
def test_compile_verifies_every_adapter_file_swapped_into_the_package(compiled):
    out, _ = compiled
    report = json.loads((out / "report.json").read_text())
    artifacts = report["artifacts"]
    layout = json.loads((out / "adapters" / "layout.json").read_text())
    assert (out / "model.onnx").is_file() and (out / "model.aoti.pt2").is_file()
    assert artifacts["aoti"]["ok"] and artifacts["aoti"]["swappable"]
    assert artifacts["aoti"]["layout"] == layout["digest"] == artifacts["adapters"]["layout"]
    assert artifacts["aoti"]["adapter_constants"] == len(layout["tensors"]) > 0
    for name in ADAPTERS:  # the compile swapped each file in and compared both shapes to the adapter alone
        assert artifacts[f"aoti+{name}"]["ok"] and len(artifacts[f"aoti+{name}"]["checks"]) == 2, name
    assert {t["adapter"] for t in layout["tensors"]} == {"lora_slot", "bottleneck_slot"}  # lora4 and lora8 share one
    # A bias of 8 elements, which Inductor would inline into the code as literals: a constant all the same.
    assert any(t["name"].endswith("adapter_down.0.bias") and t["shape"] == [8] for t in layout["tensors"])


@pytest.mark.slow
def test_one_session_swaps_every_adapter_without_recompiling(compiled):
    out, references = compiled
    session = AotiSession(out, cache_size=2)
    assert session.adapters == list(ADAPTERS) and session.active == "lora4"
    package = session.compiled
    inputs, expected = references["lora4"]
    first = session.run(inputs)["last_hidden_state"]  # no swap yet: the spec's active adapter
    assert (first - expected[0]).abs().max() < 1e-5
    outputs = {}
    for name in (*ADAPTERS, "lora4", "bn"):  # back and forth, through a cache of two
        inputs, expected = references[name]
        got = session.run(inputs, adapter=name)
        assert session.compiled is package  # the same loaded package: constants swapped, nothing recompiled
        for field, want in zip(("last_hidden_state", "pooler_output"), expected, strict=True):
            assert (got[field] - want).abs().max() < 1e-5, (name, field)
        outputs[name] = got["last_hidden_state"]
    assert (outputs["lora4"] - outputs["lora8"]).abs().max() > 1e-3  # the files do switch the adapter
    assert (outputs["lora4"] - outputs["bn"]).abs().max() > 1e-3
    session.swap(out / "adapters" / "lora8.onnx_adapter")  # a file by path works as well
    assert (session.run(inputs)["last_hidden_state"] - outputs["lora8"]).abs().max() < 1e-5


@pytest.mark.slow
def test_plain_torch_and_onnxruntime_swap_as_docs_deploy_shows(compiled):
    """docs/deploy.md's code without fxadapt: the file's tensor names are the package's constant names."""
    import onnxruntime as ort  # native runtime: only to read the file

    out, references = compiled
    compiled_package = torch._inductor.aoti_load_package(str(out / "model.aoti.pt2"))
    adapter = ort.AdapterFormat.read_adapter(str(out / "adapters" / "bn.onnx_adapter"))
    compiled_package.load_constants({name: torch.from_numpy(value.numpy().copy())
                                     for name, value in adapter.get_parameters().items()}, check_full_update=False)
    inputs, expected = references["bn"]
    with torch.no_grad():
        got = compiled_package(**inputs)["last_hidden_state"]
    assert (got - expected[0]).abs().max() < 1e-5


@pytest.mark.slow
def test_wrong_files_and_packages_are_refused(compiled, tmp_path):
    out, references = compiled
    session = AotiSession(out)
    layout = session.layout
    inputs = references["bn"][0]
    before = session.run(inputs, adapter="bn")["last_hidden_state"]
    other = Layout([Tensor(t.name, tuple(48 if d == 32 else d for d in t.shape), t.dtype, t.adapter)
                    for t in layout.tensors], layout.model_class)  # the same adapters on a hidden size 48 model
    write_adapter_file(tmp_path / "other.onnx_adapter", other, {t.name: t.identity_value() for t in other.tensors})
    fewer = Layout(layout.tensors[1:], layout.model_class)
    write_adapter_file(tmp_path / "fewer.onnx_adapter", fewer, {t.name: t.identity_value() for t in fewer.tensors})
    for file in ("other", "fewer"):
        with pytest.raises(UserError, match="another model or adapter layout"):
            session.run(inputs, adapter=tmp_path / f"{file}.onnx_adapter")
    with pytest.raises(UserError, match="unknown adapter 'nope'"):
        session.swap("nope")
    assert torch.equal(session.run(inputs)["last_hidden_state"], before)  # a refused file changed nothing
    # An OUT without the package, and a package beside another model's layout.
    shutil.copytree(out / "adapters", tmp_path / "bare" / "adapters")
    with pytest.raises(UserError, match="no model.aoti.pt2"):
        AotiSession(tmp_path / "bare")
    shutil.copy(out / "model.aoti.pt2", tmp_path / "bare" / "model.aoti.pt2")
    renamed = Layout([Tensor("other." + t.name, t.shape, t.dtype, t.adapter) for t in layout.tensors],
                     layout.model_class)
    (tmp_path / "bare" / "adapters" / "layout.json").write_text(json.dumps(renamed.to_json()))
    with pytest.raises(UserError, match="does not match adapters/layout.json"):
        AotiSession(tmp_path / "bare")


def test_swappable_without_a_swappable_format_or_method_exits_2(tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    assert main(["compile", "builtin:tiny-bert", "--spec", str(spec), "-o", str(tmp_path / "a"), "--format",
                 "torchscript,pt2", "--swappable"]) == 2
    assert "add onnx or aoti" in capsys.readouterr().err and not (tmp_path / "a").exists()
    spec.write_text(json.dumps({**SPEC, "active": {"stack": ["lora4", "bn"]}}))  # a block: refused up front
    assert main(["compile", "builtin:tiny-bert", "--spec", str(spec), "-o", str(tmp_path / "b"), "--format",
                 "aoti", "--swappable"]) == 2
    assert "composition blocks" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_aoti_session_outside_a_swappable_out_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a swappable model"):
        AotiSession(tmp_path)
    with pytest.raises(UserError, match="cache_size"):
        AotiSession(tmp_path, cache_size=0)


@pytest.mark.slow
def test_one_set_of_adapter_files_serves_the_onnx_model_and_the_package(compiled):
    from fxadapt.runtime import Session

    out, _ = compiled
    artifacts = json.loads((out / "report.json").read_text())["artifacts"]
    assert all(artifacts[f"{kind}+{name}"]["ok"] for kind in ("onnx", "aoti") for name in ADAPTERS)
    onnx, package = Session(out), AotiSession(out)
    inputs = {"input_ids": torch.arange(12).reshape(2, 6) % 100, "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    for name in ADAPTERS:
        got = package.run(inputs, adapter=name)["last_hidden_state"].numpy()
        assert abs(got - onnx.run(inputs, adapter=name)["last_hidden_state"]).max() < 1e-5, name
