"""Composition blocks for the Python API, named and built as in AdapterHub `adapters` 1.3.0
(`adapters.composition`):

    model.set_active_adapters(Stack("a", Parallel("b", "c")))
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic", set_active=True)
    model.set_active_adapters(Average("a", "b", weights=[0.3, 0.7]))

They are the compiler's own blocks (fxadapt/composition.py: one `Block` type, these its constructors);
this module keeps the public names in one place. Validation (known adapters, the reference's nesting and
depth rules, which methods a block may hold) happens when a setup is activated, as in the reference.
"""

from __future__ import annotations

from .composition import Average, BatchSplit, Block, Fuse, MultiTask, Parallel, Split, Stack, from_json

AdapterCompositionBlock = Block  # the reference's base class name

__all__ = ["AdapterCompositionBlock", "Average", "BatchSplit", "Block", "Fuse", "MultiTask", "Parallel", "Split",
           "Stack", "from_json"]
