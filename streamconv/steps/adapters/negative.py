"""Negative ``axis``/``axes`` attributes of ops onnx adapts at 11 -> 10.

Opset 11 let these ops count axes from the back.  onnx's own 11 -> 10
adapters keep a negative axis, which opset 10's schemas reject (the checker:
"Invalid value(-1) for attribute 'axis'"), so the axis is made non-negative
here with the rank of the input it counts in; the rest of the step is the same
as onnx's (only the range of the attribute changed).
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute
from .._schema import fit_older_schema
from .axes import normalise

_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
           "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")


def _non_negative(node: onnx.NodeProto, ctx: StepContext, name: str) -> onnx.NodeProto:
    value = attribute(node, name)
    if value is None:
        return node
    single = isinstance(value, int)
    given = [value] if single else [int(v) for v in value]
    if not any(a < 0 for a in given):
        return node
    axes = normalise(given, ctx.rank_of(node.input[0]), name)
    out = onnx.NodeProto()
    out.CopyFrom(node)
    kept = [a for a in node.attribute if a.name != name]
    del out.attribute[:]
    out.attribute.extend(kept)
    out.attribute.append(onnx.helper.make_attribute(name, axes[0] if single else axes))
    return out


@adapter("ArgMax", 11)
@adapter("ArgMin", 11)
@adapter("Concat", 11)
@adapter("Softmax", 11)
@adapter("LogSoftmax", 11)
def axis_op(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """A negative ``axis`` counted in the first input's rank."""
    return [_non_negative(node, ctx, "axis")]


@adapter("Flatten", 11)
def flatten(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Flatten's axis ranges over [-r, r]; a negative one is -r..-1, i.e. 0..r-1."""
    return [_non_negative(node, ctx, "axis")]


def _reduce(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    return [_non_negative(node, ctx, "axes")]


for _op in _REDUCE:
    adapter(_op, 11)(_reduce)


@adapter("TopK", 11)
def topk(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """A negative axis made non-negative; ``largest``/``sorted`` only at their defaults."""
    fitted, problems = fit_older_schema(_non_negative(node, ctx, "axis"), ctx.opset, ctx)
    if problems:
        raise Refusal("; ".join(problems))
    return [fitted]
