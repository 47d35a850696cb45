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


def reference_cases() -> list[str]:
    return sorted(p.name for p in (REFERENCE / "cases").iterdir() if p.is_dir())


def load_case(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    case = REFERENCE / "cases" / name
    return json.loads((case / "case.json").read_text()), load_file(str(case / "io.safetensors"))


@pytest.fixture
def write_spec(tmp_path):
    def write(data, name: str = "spec.json") -> Path:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path
    return write
