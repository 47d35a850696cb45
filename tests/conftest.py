"""Shared helpers: reference fixtures, tiny models, compiling into tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    # One intra-op thread per xdist worker, so two workers do not fight over two cores.
    torch.set_num_threads(1)


# The reference cases the fast tier (`pytest -m "not slow"`) runs: one per method and one per composition block
# (methods in config variants once: VeRA for VeRA/DVoRA, LoReFT for the ReFT family), on the tiny BERT, the
# cheapest to compile (Compacter++ has a GPT-2 case only). Every other case, including any added later, is marked
# slow; the full suite runs them all.
FAST_REFERENCE_CASES = frozenset({
    # bottleneck family
    "bert__seq_bn", "bert__double_seq_bn", "bert__par_bn", "bert__scaled_par_bn", "bert__seq_bn_gating",
    "bert__adapterplus", "bert__compacter", "gpt2__compacterpp", "bert__seq_bn_inv",
    # LoRA family, PEFT checkpoints
    "bert__lora_qv", "bert__ia3", "bert_seqcls__vera", "bert__dora", "bert__lora_gating", "bert__mtl_lora_gating",
    "bert__peft_lora",
    # prefix, prompt, ReFT, unions
    "bert__prefix_tuning", "bert__prompt_tuning", "bert__loreft", "bert__union_lora_seq_bn",
    # composition blocks
    "bert__stack_bn", "bert__parallel_lora", "bert__fuse", "bert__split_bn", "bert__batch_split_lora",
    "bert__average_bn", "bert__multi_task_lora",
    # a config union (UniPELT: gated prefix, seq_bn and LoRA) in a block
    "bert__batch_split_unipelt",
})


def reference_cases() -> list[str]:
    return sorted(p.name for p in (REFERENCE / "cases").iterdir() if p.is_dir())


def reference_case_params() -> list:
    """reference_cases() as pytest parameters, all but FAST_REFERENCE_CASES marked slow."""
    cases = reference_cases()
    missing = sorted(FAST_REFERENCE_CASES - set(cases))
    if missing:  # a renamed or removed fixture must not silently drop a method or block from the fast tier
        raise LookupError(f"FAST_REFERENCE_CASES names no fixture {missing}: pick another representative")
    blocks = {c: _blocks(json.loads((REFERENCE / "cases" / c / "case.json").read_text()).get("setup")) for c in cases}
    uncovered = set().union(*blocks.values()) - set().union(*(blocks[c] for c in FAST_REFERENCE_CASES))
    if uncovered:
        raise LookupError(f"no case in FAST_REFERENCE_CASES composes a {sorted(uncovered)} block: add one")
    return [pytest.param(c, marks=() if c in FAST_REFERENCE_CASES else pytest.mark.slow) for c in cases]


def _blocks(setup) -> set[str]:
    """The composition block kinds in a case's setup JSON ("stack", "parallel", ...)."""
    if not isinstance(setup, dict):
        return set()
    kinds = setup.keys() & {"stack", "parallel", "fuse", "split", "batch_split", "average", "multi_task"}
    return set(kinds).union(*(_blocks(child) for kind in kinds for child in setup[kind]))


def load_case(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    case = REFERENCE / "cases" / name
    return json.loads((case / "case.json").read_text()), load_file(str(case / "io.safetensors"))


@pytest.fixture(scope="module")
def captured():
    """The tiny reference BERT captured once per test module (captures are the slow part); a module that needs
    another model defines its own `captured`."""
    from fxadapt.lifecycle.base_graph import capture_base  # imported here so that collection stays fast

    return capture_base(str(REFERENCE / "models" / "bert"))


@pytest.fixture
def model(captured):
    """A fresh AdaptedModel over the module's one capture."""
    import fxadapt

    return fxadapt.AdaptedModel(*captured)


@pytest.fixture
def write_spec(tmp_path):
    def write(data, name: str = "spec.json") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path
    return write
