"""Compare an artifact's outputs with the eager PyTorch reference, output by output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class OutputError:
    name: str
    max_abs: float
    max_rel: float  # max |a - r| / max |r|: relative to the output's scale, stable near zero entries
    ok: bool

    def to_json(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "ok": self.ok}


def compare(names: list[str], reference: list[torch.Tensor], actual: list[Any], atol: float,
            rtol: float = 0.0) -> list[OutputError]:
    """Per-output errors; an output is ok when max |a - r| <= atol + rtol · max |r|.

    The relative part is taken against the output's scale, not per element: an element near zero
    inside a large activation carries the rounding of its neighbours (e.g. another runtime's attention
    kernel), which says nothing about a wrong rewrite."""
    if len(actual) != len(reference):
        raise ValueError(f"artifact returned {len(actual)} outputs, expected {len(reference)} ({', '.join(names)})")
    errors = []
    for name, ref, got in zip(names, reference, actual, strict=True):
        ref_np = ref.detach().to(torch.float64).numpy()
        got_np = np.asarray(got.detach().numpy() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
        if ref_np.shape != got_np.shape:
            errors.append(OutputError(name, float("inf"), float("inf"), False))
            continue
        max_abs = float(np.max(np.abs(ref_np - got_np))) if ref_np.size else 0.0
        scale = float(np.max(np.abs(ref_np))) if ref_np.size else 0.0
        max_rel = max_abs / scale if scale > 0 else max_abs
        ok = bool(max_abs <= atol + rtol * scale)
        errors.append(OutputError(name, max_abs, max_rel, ok))
    return errors
