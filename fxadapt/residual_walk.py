"""Residual adds found from graph structure: where a sub-layer's output rejoins the residual stream.

The usual form is projection -> (data movement) -> add(h, x). Others: a norm of the sub-layer output
before the add (Gemma 2/3's post-attention and post-FFN norms), and a sub-layer with no projection of
its own (a mixture of experts whose experts are one batched tensor), found as the add after the
attention's that is fed by a value computed from the attention's output.
"""

from __future__ import annotations

from collections import deque

from torch import fx

from .graph_ops import ADD, ATTENTION, PASS_THROUGH, SOFTMAX, is_call, is_projection


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if val is not None and hasattr(val, "shape") else None


def forward_residual_add(projection: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(add, h, x): the residual add a projection's output flows into through data-movement ops."""
    node = projection
    for _ in range(8):
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if is_call(user, ADD) and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args):
            other = user.args[1] if user.args[0] is node else user.args[0]
            if other is node:
                return None
            return user, node, other
        if not is_call(user, PASS_THROUGH):
            return None
        node = user
    return None


def residual_add(projection: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """`forward_residual_add`, else the first add reached forwards (through any ops, a norm of the
    sub-layer output included: Gemma 2/3's post-attention and post-FFN norms) whose other operand is
    an ancestor of the projection: the skip connection around the sub-layer."""
    direct = forward_residual_add(projection)
    if direct is not None:
        return direct
    downstream, queue = {projection}, deque([projection])
    while queue and len(downstream) < 48:
        node = queue.popleft()
        for user in node.users:
            if user in downstream or user.op != "call_function" or is_projection(user):
                continue
            if is_call(user, ATTENTION | SOFTMAX):
                continue
            if is_call(user, ADD) and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args):
                inside = [a in downstream for a in user.args]
                if inside.count(True) == 1 and shape_of(user) == shape_of(projection):
                    other = user.args[inside.index(False)]
                    if _is_ancestor(other, projection):
                        return user, user.args[inside.index(True)], other
            downstream.add(user)
            queue.append(user)
    return None


def _is_ancestor(candidate: fx.Node, node: fx.Node, limit: int = 6000) -> bool:
    queue, seen = deque([node]), {node}
    while queue and len(seen) < limit:
        for parent in queue.popleft().all_input_nodes:
            if parent is candidate:
                return True
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return False


def next_sublayer_add(stream: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(add, h): an add taking `stream` (a sub-layer's residual output, or a cast or view of it) and a
    value computed from it."""
    aliases, queue = [stream], deque([stream])
    while queue and len(aliases) < 16:
        for user in queue.popleft().users:
            if is_call(user, PASS_THROUGH) and user not in aliases and shape_of(user) == shape_of(stream):
                aliases.append(user)
                queue.append(user)
    for alias in aliases:
        for user in alias.users:
            if not (is_call(user, ADD) and len(user.args) == 2 and all(isinstance(a, fx.Node) for a in user.args)):
                continue
            other = user.args[1] if user.args[0] is alias else user.args[0]
            if other not in aliases and shape_of(user) == shape_of(stream) and _is_ancestor(stream, other):
                return user, other
    return None
