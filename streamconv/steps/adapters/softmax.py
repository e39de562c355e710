"""Softmax, LogSoftmax, Hardmax 13 -> 12: one axis, not the 2-D coercion.

Before 13 these ops flattened the input to 2-D at ``axis`` and normalised over
every dimension from ``axis`` on.  That equals the 13 meaning only when
``axis`` is the last dimension; otherwise the axis is moved last with a
Transpose, normalised there, and moved back.  (onnx's own 13 -> 12 adapter
keeps the node as it is, which gives wrong numbers for a non-last axis.)
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute


@adapter("Softmax", 13)
@adapter("LogSoftmax", 13)
@adapter("Hardmax", 13)
def one_axis(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    axis = int(attribute(node, "axis", -1))
    rank = ctx.rank_of(node.input[0])
    if rank is None:
        if axis == -1:
            return [node]
        raise Refusal(f"axis={axis} with an input of unknown rank (the meaning of axis "
                      "changed at 13: before, every dimension from axis on was normalised)")
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        raise Refusal(f"axis={attribute(node, 'axis', -1)} is out of range for rank {rank}")
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.attribute[:]
    out.attribute.extend(a for a in node.attribute if a.name != "axis")
    if axis == rank - 1:
        out.attribute.append(onnx.helper.make_attribute("axis", rank - 1))
        return [out]
    perm = [d for d in range(rank) if d != axis] + [axis]
    back = [perm.index(d) for d in range(rank)]
    moved = ctx.node("Transpose", [node.input[0]], base=f"{node.name or node.op_type}/moved",
                     perm=perm)
    out.input[0] = moved.output[0]
    normalised = ctx.fresh(f"{node.name or node.op_type}/normalised")
    out.output[0] = normalised
    out.attribute.append(onnx.helper.make_attribute("axis", rank - 1))
    restore = ctx.node("Transpose", [normalised], [node.output[0]],
                       base=f"{node.name or node.op_type}/restored", perm=back)
    return [moved, out, restore]
