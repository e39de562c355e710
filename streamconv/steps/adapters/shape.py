"""Shape 15 -> 14: the attributes start and end become a Slice of the whole shape.

Shape-15 returns ``shape[start:end]``: a negative start or end counts from
the back (rank added once), then both are clamped to ``[0, rank]``; start at
or past end gives an empty result.  Slice (opset 10 on) clamps its starts and
ends along a 1-D tensor in exactly that way, so ``Shape -> Slice(start, end)``
is the same at every rank.  When the rank is known the bounds are resolved
here, so the Slice holds plain non-negative indices.
"""

from __future__ import annotations

import numpy as np
import onnx

from .._context import Refusal, StepContext, adapter, attribute, without

#: an end that Slice clamps to the length, whatever the rank
_TO_THE_END = np.iinfo(np.int64).max


def _resolved(index: int, rank: int) -> int:
    """*index* as Shape-15 reads it for a tensor of *rank*: from the back if negative, clamped."""
    if index < 0:
        index += rank
    return min(max(index, 0), rank)


@adapter("Shape", 15)
def start_end_to_slice(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Shape 15 -> 14: Shape without start/end, followed by a Slice when they are set."""
    start = attribute(node, "start")
    end = attribute(node, "end")
    bare = without(node, "start", "end")
    if start is None and end is None:
        return [bare]
    start = 0 if start is None else int(start)
    rank = ctx.rank_of(node.input[0])
    if rank is not None:
        start = _resolved(start, rank)
        end = rank if end is None else _resolved(int(end), rank)
        if start == 0 and end == rank:
            return [bare]
    elif end is None:
        end = _TO_THE_END
    if len(node.output) != 1 or not node.output[0]:
        raise Refusal("the node has no output")
    base = node.name or "Shape"
    whole = ctx.fresh(f"{base}/whole")
    bare.output[0] = whole
    starts, starts_name = ctx.constant(np.array([start], dtype=np.int64), base=f"{base}/start")
    ends, ends_name = ctx.constant(np.array([int(end)], dtype=np.int64), base=f"{base}/end")
    axes, axes_name = ctx.constant(np.array([0], dtype=np.int64), base=f"{base}/axis")
    part = ctx.node("Slice", [whole, starts_name, ends_name, axes_name], [node.output[0]],
                    base=f"{base}/slice")
    return [bare, starts, ends, axes, part]
