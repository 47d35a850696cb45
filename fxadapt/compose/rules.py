"""The spec-level checks of a composition: every adapter may join its block, every Fuse has a fusion
definition, Parallel blocks of equal width.

Which blocks may hold which adapter is each method's own knowledge (fxadapt/methods/base.py): its module's
`BLOCKS` (the reference's `supported_compositions` per layer class), narrowed per config where a method
declares `blocks_for(config)` (a config union: the blocks all its members join), and, where some configs of
the method cannot compose, `composition_refusal(config)`. Nothing here names a method.
"""

from __future__ import annotations

from typing import Any

from ..composition import Block
from ..errors import UserError


def blocks(block: Block) -> list[Block]:
    """`block` and every block nested in it, outer first."""
    found = [block]
    for child in block.children:
        if isinstance(child, Block):
            found += blocks(child)
    return found


def allowed_blocks(method: Any, config: Any = None) -> tuple[str, ...]:
    """The blocks a method module may join (none when it declares no BLOCKS); with a config, the blocks that
    config may join where the method narrows them (`blocks_for`)."""
    narrowed = getattr(method, "blocks_for", None)
    if config is not None and narrowed is not None:
        return tuple(narrowed(config))
    return tuple(getattr(method, "BLOCKS", ()))


def refusal(adapter: Any) -> str | None:
    """Why this adapter's config cannot compose, or None (methods without `composition_refusal` always can)."""
    check = getattr(adapter.method, "composition_refusal", None)
    return check(adapter.config) if check is not None else None


def check_setup(spec: Any) -> None:
    """UserError naming the block, the rule and the JSON path where a composition cannot be lowered."""
    setup: Block = spec.setup
    all_blocks = blocks(setup)
    for block in all_blocks:
        for name in dict.fromkeys(block.flatten()):
            adapter = spec.adapters[name]
            method = adapter.method.NAME
            allowed = allowed_blocks(adapter.method, adapter.config)
            if block.kind not in allowed:
                narrowed = allowed != allowed_blocks(adapter.method)
                who = "this config composes" if narrowed else f"{method} adapters compose"
                why = "the blocks all its members join" if narrowed else "the reference's supported compositions"
                raise UserError(
                    f"{block.path}: {'an' if block.kind[0] in 'aeiou' else 'a'} {block.kind} block cannot hold adapter "
                    f"{name!r} ({method}, {adapter.path}); "
                    f"{who} only in {', '.join(allowed) or 'no block'} ({why}). Activate it alone or use another "
                    "block.")
            reason = refusal(adapter)
            if reason is not None:
                raise UserError(f"{block.path}: {adapter.path} cannot be composed: {reason}. Activate it alone.")
    parallels = [b for b in all_blocks if b.kind == "parallel"]
    for other in parallels[1:]:  # the reference replicates once; later Parallels split that batch alike
        if len(other.children) != len(parallels[0].children):
            raise UserError(f"{other.path}: parallel blocks of one setup share one replication of the batch, so "
                            f"they need equal numbers of children; {parallels[0].path} has "
                            f"{len(parallels[0].children)}, this one {len(other.children)}.")
    for block in all_blocks:
        if block.kind == "fuse" and not any(f.name == block.fusion_name for f in spec.fusions):
            raise UserError(f"{block.path}: fuse block {block.fusion_name!r} has no fusion definition; add "
                            f"{{\"adapters\": {[c if isinstance(c, str) else c.last() for c in block.children]}}} "
                            "(or {\"load\": DIR} of a saved AdapterFusion) to \"fusions\".")
