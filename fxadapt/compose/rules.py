"""Which blocks may hold which adapter methods (the reference's `supported_compositions` per layer class),
and the spec-level checks of a composition: every Fuse has a fusion definition, at most one Parallel.

    bottleneck: Stack, Fuse, Split, Parallel, BatchSplit, Average
    lora:       Stack, BatchSplit, Average, Parallel, MultiTask
    mtl_lora:   the same (the reference's LoRALinear holds it)
"""

from __future__ import annotations

from typing import Any

from ..composition import Block
from ..errors import UserError

SUPPORTED: dict[str, tuple[str, ...]] = {
    "bottleneck": ("stack", "fuse", "split", "parallel", "batch_split", "average"),
    "lora": ("stack", "batch_split", "average", "parallel", "multi_task"),
    "mtl_lora": ("stack", "batch_split", "average", "parallel", "multi_task"),
}


def blocks(block: Block) -> list[Block]:
    """`block` and every block nested in it, outer first."""
    found = [block]
    for child in block.children:
        if isinstance(child, Block):
            found += blocks(child)
    return found


def check_setup(spec: Any) -> None:
    """UserError naming the block, the rule and the JSON path where a composition cannot be lowered."""
    setup: Block = spec.setup
    all_blocks = blocks(setup)
    for block in all_blocks:
        for name in dict.fromkeys(block.flatten()):
            adapter = spec.adapters[name]
            method = adapter.method.NAME
            allowed = SUPPORTED.get(method, ())
            if block.kind not in allowed:
                raise UserError(
                    f"{block.path}: a {block.kind} block cannot hold adapter {name!r} ({method}, {adapter.path}); "
                    f"{method} adapters compose only in {', '.join(allowed) or 'no block'} (the reference's "
                    "supported compositions). Activate it alone or use another block.")
            if method == "lora" and adapter.config.variant != "lora":
                raise UserError(f"{block.path}: {adapter.path} is a {adapter.config.variant} adapter; fxadapt composes "
                                "plain LoRA only so far. Activate it alone.")
            if method == "bottleneck" and (adapter.config.phm_layer or adapter.config.inv_adapter):
                raise UserError(f"{block.path}: {adapter.path} uses PHM layers or an invertible adapter, which "
                                "fxadapt does not compose yet. Activate it alone.")
    parallels = [b for b in all_blocks if b.kind == "parallel"]
    if len(parallels) > 1:
        raise UserError(f"{parallels[1].path}: only one parallel block per setup is supported (the batch is "
                        f"replicated once, at the model inputs); {parallels[0].path} is another.")
    for block in all_blocks:
        if block.kind == "fuse" and not any(f.name == block.fusion_name for f in spec.fusions):
            raise UserError(f"{block.path}: fuse block {block.fusion_name!r} has no fusion definition; add "
                            f"{{\"adapters\": {[c if isinstance(c, str) else c.last() for c in block.children]}}} "
                            "(or {\"load\": DIR} of a saved AdapterFusion) to \"fusions\".")
