"""Split 18 -> 17 (num_outputs) and 11 -> 10 (negative axis).

- 18 added the attribute ``num_outputs``: equal parts of ``ceil(len /
  num_outputs)``, the last one smaller when the length does not divide.
  Below 18 a Split without sizes only makes equal parts, so the sizes are
  written out as a ``split`` input; that needs the axis length.
- 11 allowed a negative axis; below, it is counted from the front, which
  needs the input's rank.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse


def part_sizes(length: int, parts: int) -> list[int]:
    """The sizes Split-18 gives *parts* outputs of an axis of *length* (onnx's rule).

    Raises Refusal when the rule leaves the last part a negative size.
    """
    if parts < 1:
        raise Refusal(f"num_outputs={parts} must be at least 1")
    size = math.ceil(length / parts)
    sizes = [size] * (parts - 1) + [length - size * (parts - 1)]
    if sizes[-1] < 0:
        raise Refusal(f"num_outputs={parts} cannot split an axis of length {length} "
                      f"into parts of {size}")
    return sizes


@adapter("Split", 18)
def num_outputs_to_sizes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Split 18 -> 17: num_outputs becomes an explicit split input of sizes."""
    parts = attribute(node, "num_outputs")
    if parts is None:
        return [fit_or_refuse(node, ctx)]
    parts = int(parts)
    if len(node.input) > 1 and node.input[1]:
        raise Refusal("the node sets both num_outputs and a split input")
    if parts != len(node.output):
        raise Refusal(f"num_outputs={parts} but the node has {len(node.output)} outputs")
    axis = int(attribute(node, "axis", 0))
    data = node.input[0]
    shape = ctx.shape_of(data)
    length = None
    if shape is not None and -len(shape) <= axis < len(shape):
        length = shape[axis]
    if length is None:
        raise Refusal(f"num_outputs={parts} needs the length of axis {axis} of input "
                      f"{data!r}, which shape inference could not tell (below 18 Split "
                      "makes unequal parts only from explicit sizes)")
    sizes = part_sizes(length, parts)
    const, sizes_name = ctx.constant(np.array(sizes, dtype=np.int64),
                                     base=f"{node.name or 'Split'}/split")
    out = without(node, "num_outputs")
    del out.input[:]
    out.input.extend([data, sizes_name])
    return [const, fit_or_refuse(out, ctx)]


@adapter("Split", 11)
def axis_from_front(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Split 11 -> 10: a negative axis is counted from the front."""
    axis = int(attribute(node, "axis", 0))
    if axis >= 0:
        return [fit_or_refuse(node, ctx)]
    rank = ctx.rank_of(node.input[0])
    if rank is None:
        raise Refusal(f"axis={axis} is negative and the rank of input {node.input[0]!r} is "
                      "unknown (below 11 the axis must be counted from the front)")
    if axis < -rank:
        raise Refusal(f"axis={axis} is out of range for an input of rank {rank}")
    out = without(node, "axis")
    out.attribute.append(onnx.helper.make_attribute("axis", axis + rank))
    return [fit_or_refuse(out, ctx)]
