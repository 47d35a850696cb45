"""`--format aoti`: an AOTInductor package (OUT/model.aoti.pt2), compiled ahead of time to native code.

    ExportedProgram --torch._inductor.aoti_compile_and_package--> model.aoti.pt2
    torch._inductor.aoti_load_package(path)(**inputs) -> {output name: tensor}

The program is the one every format is made from (export/prepare.py: outputs as a plain dict), so the
package loads without transformers. Batch and sequence dims stay dynamic (the program carries them).
Compiling runs a C++ compiler: minutes for BERT-base on two cores, so the format is opt-in, not in `all`.
The weights are stored as the package's constants under their state-dict names (`load_constants`
replaces them without recompiling; `constant_names` lists them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .reproducible import save_reproducibly


def export_aoti(ep: torch.export.ExportedProgram, path: Path) -> dict[str, Any]:
    """Compile `ep` into an AOTInductor package at `path` (written under a scratch name, then moved)."""
    import torch._inductor  # heavy (the compiler stack), and only this format needs it

    save_reproducibly(path, lambda p: torch._inductor.aoti_compile_and_package(ep, package_path=p))
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
