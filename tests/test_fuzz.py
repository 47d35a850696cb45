"""Property-based fuzzing of what users and untrusted files hand to fxadapt (issue #13): generated specs and
mutated checkpoints either compile (the rewritten graph runs) or fail with a UserError — never another
exception, which the CLI would report as a bug with a traceback (exit 1).

The target is `parse_spec` + `pipeline.build` + one forward pass on the tiny reference BERT, with captures
cached per shape so that thousands of cases fit in CI (export is covered by the CLI tests: a spec that builds
and runs exports like any other). Counts: FXADAPT_FUZZ_SPECS (default 1000) and FXADAPT_FUZZ_CHECKPOINTS
(default 200).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REFERENCE
from fxadapt import pipeline
from fxadapt.errors import UserError
from fxadapt.spec import parse_spec

pytestmark = pytest.mark.slow

BERT = str(REFERENCE / "models" / "bert")
SPECS = int(os.environ.get("FXADAPT_FUZZ_SPECS", "1000"))
CHECKPOINTS = int(os.environ.get("FXADAPT_FUZZ_CHECKPOINTS", "200"))
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

METHODS = ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter++", "seq_bn_inv",
           "lora", "ia3", "vera", "dora", "prefix_tuning", "prompt_tuning", "loreft", "noreft", "direft", "mam",
           "unipelt", "pfeiffer", "houlsby", "adapterplus", "mtl_lora", "nonsense"]
KEYS = ["r", "alpha", "dropout", "reduction_factor", "non_linearity", "leave_out", "attn_matrices", "mh_adapter",
        "output_adapter", "scaling", "use_gating", "selfattn_lora", "intermediate_lora", "output_lora",
        "prefix_length", "bottleneck_size", "flat", "prompt_length", "layers", "phm_dim", "residual_before_ln",
        "composition_mode", "init_weights", "vera_d", "vera_b", "use_dora", "is_parallel", "original_ln_after",
        "n_tasks", "architecture", "low_rank", "hypercomplex_nonlinearity", "shared_W_phm", "combine"]
# Numbers a careless or hostile user writes; sizes stay small enough to allocate (bounds have own tests).
NUMBERS = st.one_of(st.integers(-3, 40), st.sampled_from([0.0, -0.5, 0.5, 1.5, 1e-9, float("nan"), float("inf")]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(string.printable, max_size=6),
                    st.sampled_from(["relu", "swish", "q", "v", "k", "all", "0", "learned", "channel", "post_add"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(KEYS), inner, max_size=2), max_leaves=4)
NAMES = st.one_of(st.sampled_from(["a", "b", "c"]), st.text(string.printable, min_size=0, max_size=8),
                  st.sampled_from(["__init__", "../x", "a.b", "x" * 200, ""]))


def _literal(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


# Valid starting points; each generated spec is one of these with 0-3 random mutations, so that most cases get
# past the first check and reach the deep ones (config fields, blocks, sizes, the graph rewrite).
DEFINITIONS = ["seq_bn", "double_seq_bn", "par_bn", "scaled_par_bn", "compacter", "compacter++", "seq_bn_inv",
               "adapterplus", "lora[r=4,alpha=8]", "lora[r=2,alpha=4,intermediate_lora=True,output_lora=True]",
               "ia3", "vera", "dora", "lora[use_gating=True]", "prefix_tuning[prefix_length=4]",
               "prefix_tuning[flat=True,prefix_length=3]", "prompt_tuning[prompt_length=3]", "loreft", "noreft",
               "direft", "mam", "unipelt", "lora|seq_bn", {"config": "seq_bn", "reduction_factor": 8},
               {"architecture": "lora", "r": 2, "alpha": 4}, {"mh_adapter": True, "output_adapter": False}]
SETUPS = [None, "a", {"stack": ["a", "b"]}, {"parallel": ["a", "b"]}, {"fuse": ["a", "b"]},
          {"split": ["a", "b"], "splits": [4, 4]}, {"batch_split": ["a", "b"], "batch_sizes": [1, 1]},
          {"average": ["a", "b"], "weights": [0.3, 0.7]}, {"multi_task": ["a", "b"]},
          {"stack": ["c", {"parallel": ["a", "b"]}]}, {"stack": [{"fuse": ["a", "b"]}, "c"]}]


def _paths(value, prefix=()):
    """Every path to a node of a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


@st.composite
def mutated(draw, value):
    """`value` with 0-3 mutations: a node replaced by a random value, a dict key deleted or renamed."""
    value = copy.deepcopy(value)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(list(_paths(value))))
        if not path:
            return draw(VALUES)
        parent = value
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "rename"]))
        if action == "replace" or isinstance(parent, list):
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.sampled_from(KEYS + ["adapters", "active", "fusions"]))] = parent.pop(path[-1])
    return value


@st.composite
def specs(draw):
    names = ["a", "b", "c"]
    if draw(st.integers(0, 9)) == 0:
        names[-1] = draw(NAMES)
    spec: dict = {"adapters": {n: draw(st.sampled_from(DEFINITIONS)) for n in names}}
    setup = draw(st.sampled_from(SETUPS))
    if setup is not None:
        spec["active"] = setup
        if "fuse" in json.dumps(setup):
            spec["fusions"] = [{"adapters": ["a", "b"], "config": draw(st.sampled_from(["dynamic", "static"]))}]
    if draw(st.integers(0, 3)) == 0:
        spec["optimize"] = {"merge_lora": draw(st.booleans())}
    return draw(mutated(spec))


@pytest.fixture(scope="module")
def cached_capture():
    """pipeline.capture with one capture per model/shape/inputs, handed out as deep copies."""
    real, cache = pipeline.capture, {}

    def capture(model, example_inputs=None, task=None, **pins):
        shapes = tuple(sorted((k, tuple(v.shape)) for k, v in (example_inputs or {}).items()))
        # repr: pins may hold dynamic_shapes dicts (multi_task's task_ids dims), which do not hash.
        key = (model if isinstance(model, str) else type(model).__name__, task, repr(sorted(pins.items())), shapes)
        if key not in cache:
            cache[key] = real(model, example_inputs, task=task, **pins)
        return copy.deepcopy(cache[key])

    pipeline.capture = capture
    yield
    pipeline.capture = real


def _compile_or_user_error(data, base_dir: Path) -> str:
    """'ok' or 'user error'; any other exception propagates and fails the test with the input shown."""
    try:
        spec = parse_spec(data, base_dir)
        result = pipeline.build(BERT, spec)
        with torch.no_grad():
            result.graph(**result.captured.example_inputs)
    except UserError as exc:
        assert str(exc).strip(), "a UserError must say what is wrong"
        return "user error"
    return "ok"


@settings(max_examples=SPECS, **SETTINGS)
@given(data=specs())
def test_generated_specs_compile_or_fail_cleanly(cached_capture, tmp_path_factory, data):
    _compile_or_user_error(data, tmp_path_factory.getbasetemp())


CASES = ["bert__seq_bn", "bert__lora_qv", "bert__compacter", "bert__ia3", "bert__prefix_tuning", "bert__loreft",
         "bert__peft_lora", "bert__vera", "bert__dora", "bert__mam"]


@st.composite
def mutations(draw):
    case = draw(st.sampled_from([c for c in CASES if (REFERENCE / "cases" / c / "adapter").is_dir()]))
    target = draw(st.sampled_from(["config_value", "config_key", "config_bytes", "weights_bytes", "weights_tensor"]))
    return case, target, draw(VALUES), draw(st.integers(0, 2**31)), draw(st.sampled_from(KEYS + ["name", "config"]))


def _mutate(directory: Path, target: str, value, seed: int, key: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    config_file = directory / "adapter_config.json"
    weights = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".safetensors"))
    if target in ("config_value", "config_key"):
        data = json.loads(config_file.read_text())
        holder = data.get("config", data) if isinstance(data.get("config"), dict) else data
        if target == "config_value" and holder:
            holder[sorted(holder)[seed % len(holder)]] = value
        else:
            holder[key] = value
        config_file.write_text(json.dumps(data))
    elif target == "config_bytes":
        raw = bytearray(config_file.read_bytes())
        raw[seed % len(raw)] = seed % 256
        config_file.write_bytes(bytes(raw[: len(raw) - seed % 3]))
    elif target == "weights_bytes":
        file = weights[seed % len(weights)]
        raw = bytearray(file.read_bytes())
        for _ in range(1 + seed % 4):
            raw[int(torch.randint(len(raw), (1,), generator=gen))] = int(torch.randint(256, (1,), generator=gen))
        file.write_bytes(bytes(raw[: len(raw) - (seed % 7) * (seed % 2)]))
    else:
        from safetensors.torch import load_file, save_file

        file = next((p for p in weights if p.suffix == ".safetensors"), None)
        tensors = load_file(str(file)) if file else torch.load(weights[0], weights_only=True)
        key_ = sorted(tensors)[seed % len(tensors)]
        change = seed % 4
        if change == 0:
            tensors[key_] = torch.zeros(tensors[key_].shape[::-1] if tensors[key_].dim() > 1 else (3,))
        elif change == 1:
            tensors[key_] = tensors[key_].to(torch.float16)
        elif change == 2:
            del tensors[key_]
        else:
            tensors[key_ + ".extra"] = torch.ones(2)
        if file:
            save_file(tensors, str(file))
        else:
            torch.save(tensors, weights[0])


@settings(max_examples=CHECKPOINTS, **SETTINGS)
@given(mutation=mutations())
def test_mutated_checkpoints_load_or_fail_cleanly(cached_capture, tmp_path_factory, mutation):
    case, target, value, seed, key = mutation
    directory = tmp_path_factory.mktemp("ckpt") / "adapter"
    shutil.copytree(REFERENCE / "cases" / case / "adapter", directory)
    _mutate(directory, target, value, seed, key)
    _compile_or_user_error({"adapters": {"a": {"load": str(directory)}}}, directory.parent)
