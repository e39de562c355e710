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


def _non_negative(node: onnx.NodeProto, ctx: StepContext, name: str,
                  inclusive: bool = False) -> onnx.NodeProto:
    value = attribute(node, name)
    if value is None:
        return node
    single = isinstance(value, int)
    given = [value] if single else [int(v) for v in value]
    if not any(a < 0 for a in given):
        return node
    rank = ctx.rank_of(node.input[0])
    if inclusive and rank is not None:
        rank += 1  # Flatten's axis may equal the rank: count in rank + 1 positions
        given = [a - 1 if a < 0 else a for a in given]
    axes = normalise(given, rank, name)
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
    """Flatten's axis ranges over [-r, r]: -1 is r - 1."""
    value = attribute(node, "axis")
    if value is None or value >= 0:
        return [node]
    rank = ctx.rank_of(node.input[0])
    if rank is None:
        raise Refusal(f"axis {value} counts from the back, and the input's rank is unknown "
                      "(opset 10 allows only non-negative axes)")
    if value < -rank:
        raise Refusal(f"axis {value} is out of range for rank {rank}")
    out = onnx.NodeProto()
    out.CopyFrom(node)
    for a in out.attribute:
        if a.name == "axis":
            a.i = value + rank
    return [out]


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
