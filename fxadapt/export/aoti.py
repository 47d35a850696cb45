"""`--format aoti`: an AOTInductor package (OUT/model.aoti.pt2), compiled ahead of time to native code.

    ExportedProgram --torch._inductor.aoti_compile_and_package--> model.aoti.pt2
    torch._inductor.aoti_load_package(path)(**inputs) -> {output name: tensor}

The program is the one every format is made from (export/prepare.py: outputs as a plain dict), so the
package loads without transformers. Batch and sequence dims stay dynamic (the program carries them).
Compiling runs a C++ compiler: minutes for BERT-base on two cores, so the format is opt-in, not in `all`.
The weights are stored as the package's constants under their state-dict names (`load_constants`
replaces them without recompiling; `constant_names` lists them).

With --swappable the package is compiled from the swappable graph (export/swappable.py), so its adapter tensors
are constants named like the layout's tensors (OUT/adapters/layout.json): an adapter file's values are loaded
with `load_constants` (`fxadapt.runtime.AotiSession`), the same files the swappable ONNX model takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapter_files import Layout
from .reproducible import save_reproducibly

PACKAGE = "model.aoti.pt2"
# Inductor inlines a 1-D weight of at most 8 elements (and a 0-d one) into the generated code as literals: an
# adapter's bias of bottleneck size 8 would then be no constant, and no load_constants could swap it. Keep every
# weight a constant under its name (measured: a seq_bn's down bias on hidden size 32 vanished without this).
INDUCTOR_CONFIGS = {"always_keep_tensor_constants": True}


def export_aoti(ep: torch.export.ExportedProgram, path: Path) -> dict[str, Any]:
    """Compile `ep` into an AOTInductor package at `path` (written under a scratch name, then moved)."""
    import torch._inductor  # heavy (the compiler stack), and only this format needs it

    save_reproducibly(path, lambda p: torch._inductor.aoti_compile_and_package(ep, package_path=p,
                                                                                inductor_configs=INDUCTOR_CONFIGS))
    return {"bytes": path.stat().st_size}


def load_aoti(path: Path) -> Any:
    """The compiled model: call it with the forward's keyword arguments."""
    import torch._inductor  # as above

    return torch._inductor.aoti_load_package(str(path))


def constant_names(compiled: Any) -> list[str]:
    """The names `load_constants` accepts (the model's state-dict names)."""
    return list(compiled.get_constant_fqns())


def swap_constants(compiled: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Replace some constants (e.g. one adapter's weights) in place, without recompiling; names not in the
    package are refused by AOTInductor itself (check=True)."""
    compiled.load_constants(tensors, check_full_update=False)


def check_adapter_constants(compiled: Any, layout: Layout, prune: bool) -> dict[str, Any]:
    """--swappable: every adapter tensor of `layout` must be a constant of the package, so that adapter files can
    replace it. `prune`: the layout is the package's alone (no ONNX model beside it), and tensors the compile
    left out leave it, as the ONNX export's unused inputs do (with INDUCTOR_CONFIGS every weight the code reads
    is a constant, so only unused ones can be missing). Returns the report's entries."""
    names = set(constant_names(compiled))
    missing = [t.name for t in layout.tensors if t.name not in names]
    if missing and prune:
        layout.tensors = [t for t in layout.tensors if t.name in names]
    elif missing:  # the ONNX model uses them, so the package computes with them too: a bug, not a user error
        raise RuntimeError(f"aoti --swappable: adapter tensor {missing[0]!r} ({len(missing)} in all) is no "
                           "constant of the AOTInductor package")
    return {"swappable": True, "layout": layout.digest, "adapter_constants": len(layout.tensors)}
