"""Byte-reproducible torch archives: the same graph and weights give the same model.ts and model.pt2 bytes.

Two things made two saves of the same program differ, both unrelated to its content:

- the archive's top folder is named after the file written (`model.ts.<random>.tmp/...` when saving to a
  temporary name first): saves go to a temporary *directory* under the final file name instead;
- node metadata `from_node` (the provenance of each node) records the `id()` of the graphs it came from:
  those ids are renumbered in order of first appearance before saving; the provenance itself is kept.

torch's `.data/serialization_id` is derived from the records' content, so it follows.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def save_reproducibly(path: str | Path, write: Callable[[str], None]) -> None:
    """Run `write(p)` for a file `p` named like `path` in a fresh directory beside it, then move it to `path`
    atomically (no partial file on failure)."""
    path = Path(path)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = scratch / path.name
        write(str(staged))
        os.replace(staged, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_program(program: torch.export.ExportedProgram, path: str | Path) -> None:
    """`torch.export.save` with graph ids in the provenance metadata numbered deterministically."""
    renumber_graph_ids(program.graph_module)
    save_reproducibly(path, lambda p: torch.export.save(program, p))


def renumber_graph_ids(gm: torch.fx.GraphModule) -> None:
    """Replace the `id()`-based `graph_id` of every `from_node` record by its order of first appearance."""
    numbers: dict[int, int] = {}

    def visit(sources) -> None:
        for source in sources or ():
            info = getattr(source, "node_info", None)
            if info is not None and hasattr(info, "graph_id"):
                info.graph_id = numbers.setdefault(info.graph_id, len(numbers))
                source._dict = None  # NodeSource caches its serialized form
            visit(getattr(source, "from_node", None))

    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                visit(node.meta.get("from_node"))
