"""Inputs that were attributes one opset below, for the ops onnx adapts that way.

Squeeze, Unsqueeze, ReduceSum and Split took their axes (split sizes) as an
input from 13 on, the other Reduce ops from 18 on.  onnx's own adapters for
these steps search the whole graph for each node's constant input, which is
quadratic in the graph's size (measured: 110 s for 18 -> 17 of a 25,000-node
graph, 6 s for 13 -> 12 of a 16,000-node chain).  Here the constant is looked
up by name; the result is the same node onnx's adapter makes.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute
from .._schema import fit_or_refuse

_REDUCE_18 = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare")


def _to_attribute(node: onnx.NodeProto, ctx: StepContext, index: int, name: str,
                  drop: tuple[str, ...] = ()) -> onnx.NodeProto:
    """*node* with input *index* (a constant) as the ints attribute *name*."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    given = node.input[index] if len(node.input) > index else ""
    del out.input[index:]
    kept = [a for a in node.attribute if a.name not in drop]
    del out.attribute[:]
    out.attribute.extend(kept)
    if given:
        value = ctx.value_of(given)
        if value is None:
            raise Refusal(f"{name} {given!r} is computed at run time; below opset "
                          f"{ctx.opset + 1} it must be a constant attribute")
        if value.size:  # an empty list means "not given" for each of these ops
            out.attribute.append(helper.make_attribute(name,
                                                       [int(v) for v in value.reshape(-1)]))
    # inputs after the moved one never exist for these ops
    return fit_or_refuse(out, ctx)


@adapter("Squeeze", 13)
@adapter("Unsqueeze", 13)
def squeeze_axes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    if node.op_type == "Unsqueeze" and (len(node.input) < 2 or not node.input[1]):
        raise Refusal("Unsqueeze without axes")
    return [_to_attribute(node, ctx, 1, "axes")]


@adapter("Split", 13)
def split_sizes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    return [_to_attribute(node, ctx, 1, "split")]


def _reduce(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """axes input -> attribute; noop_with_empty_axes=1 without axes is the identity."""
    given = node.input[1] if len(node.input) > 1 else ""
    empty = not given
    if given:
        value = ctx.value_of(given)
        empty = value is not None and value.size == 0
    if empty and int(attribute(node, "noop_with_empty_axes", 0)) == 1:
        return [helper.make_node("Identity", [node.input[0]], list(node.output[:1]),
                                 name=node.name)]
    # no axes attribute (absent or empty axes) reduces over every axis, as before
    return [_to_attribute(node, ctx, 1, "axes", drop=("noop_with_empty_axes",))]


adapter("ReduceSum", 13)(_reduce)
for _op in _REDUCE_18:
    adapter(_op, 18)(_reduce)
