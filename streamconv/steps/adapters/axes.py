"""Negative axes and indices, allowed from opset 11, below 11.

Opset 11 let Slice, Squeeze, Unsqueeze, Hardmax, Compress, Scan and OneHot
count axes from the back, and Gather and OneHot take negative indices.  Below
11 an axis must be non-negative, so a negative one is made non-negative with
the rank of the tensor it counts in (the output's for Unsqueeze, whose axes
name output dimensions).  A node that uses none of this crosses unchanged.
Negative starts and ends of Slice need nothing: they are allowed at 10.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute

__all__ = ["compress", "gather", "hardmax", "onehot", "scan", "slice_axes", "squeeze",
           "unsqueeze"]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _set(node: onnx.NodeProto, name: str, value: object) -> None:
    """Set attribute *name* of *node* to *value*, replacing any it had."""
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute(name, value))


def normalise(axes: Sequence[int], rank: int | None, what: str) -> list[int]:
    """*axes* with every negative axis counted from the front of a rank-*rank* tensor.

    Raises Refusal when an axis is negative and *rank* is unknown, or when an
    axis is out of range for *rank*.
    """
    axes = [int(a) for a in axes]
    if not any(a < 0 for a in axes):
        return axes
    if rank is None:
        raise Refusal(f"{what} {axes} counts from the back, and the rank it counts in is "
                      "unknown (opset 10 allows only non-negative axes)")
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise Refusal(f"{what} {a} is out of range for rank {rank}")
        out.append(a + rank if a < 0 else a)
    return out


def _attribute_axes(node: onnx.NodeProto, ctx: StepContext, name: str, rank: int | None
                    ) -> list[onnx.NodeProto]:
    """*node* with its int or ints attribute *name* made non-negative for *rank*."""
    value = attribute(node, name)
    if value is None:
        return [node]
    single = isinstance(value, int)
    axes = normalise([value] if single else list(value), rank, name)
    if axes == ([value] if single else list(value)):
        return [node]
    out = _copy(node)
    _set(out, name, axes[0] if single else axes)
    return [out]


@adapter("Squeeze", 11)
def squeeze(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Squeeze 11 -> 10: negative ``axes`` counted in the input's rank."""
    return _attribute_axes(node, ctx, "axes", ctx.rank_of(node.input[0]))


@adapter("Unsqueeze", 11)
def unsqueeze(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Unsqueeze 11 -> 10: negative ``axes`` counted in the output's rank."""
    rank = ctx.rank_of(node.output[0])
    if rank is None:
        given = ctx.rank_of(node.input[0])
        rank = None if given is None else given + len(attribute(node, "axes", []))
    return _attribute_axes(node, ctx, "axes", rank)


@adapter("Hardmax", 11)
def hardmax(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Hardmax 11 -> 10: a negative ``axis`` counted in the input's rank."""
    return _attribute_axes(node, ctx, "axis", ctx.rank_of(node.input[0]))


@adapter("Compress", 11)
def compress(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Compress 11 -> 10: a negative ``axis`` counted in the input's rank (none: flattened)."""
    return _attribute_axes(node, ctx, "axis", ctx.rank_of(node.input[0]))


@adapter("Scan", 11)
def scan(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Scan 11 -> 10: negative ``scan_input_axes`` and ``scan_output_axes``.

    An input axis counts in the scan input's rank; an output axis in the scan
    output's rank (the body's per-iteration output with the scan axis added).
    The directions attributes have no negative values and cross as they are.
    """
    body: onnx.GraphProto = attribute(node, "body")
    n_scan_in = int(attribute(node, "num_scan_inputs"))
    n_state = len(node.input) - n_scan_in
    out = _copy(node)
    changed = False
    in_axes = attribute(node, "scan_input_axes")
    if in_axes is not None:
        ranks = [ctx.rank_of(name) for name in node.input[n_state:]]
        fixed = [normalise([a], ranks[i] if i < len(ranks) else None,
                           f"scan_input_axes[{i}]")[0] for i, a in enumerate(in_axes)]
        if fixed != list(in_axes):
            _set(out, "scan_input_axes", fixed)
            changed = True
    out_axes = attribute(node, "scan_output_axes")
    if out_axes is not None:
        fixed = []
        for j, a in enumerate(out_axes):
            k = n_state + j
            rank = ctx.rank_of(node.output[k]) if k < len(node.output) else None
            if rank is None and k < len(body.output):
                t = body.output[k].type
                if t.WhichOneof("value") == "tensor_type" and t.tensor_type.HasField("shape"):
                    rank = len(t.tensor_type.shape.dim) + 1
            fixed.append(normalise([a], rank, f"scan_output_axes[{j}]")[0])
        if fixed != list(out_axes):
            _set(out, "scan_output_axes", fixed)
            changed = True
    return [out] if changed else [node]


@adapter("Slice", 11)
def slice_axes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Slice 11 -> 10: a constant ``axes`` input with negative axes made non-negative.

    Negative ``starts`` and ``ends`` already count from the back at 10.
    Refuses an ``axes`` input that is not a constant kept in the model.
    """
    if len(node.input) < 4 or not node.input[3]:
        return [node]  # axes default to 0 .. len(starts)-1
    value = ctx.value_of(node.input[3])
    if value is None:
        raise Refusal(f"axes {node.input[3]!r} is not a constant, so whether it counts from "
                      "the back (not allowed at opset 10) cannot be told")
    axes = normalise(value.reshape(-1).tolist(), ctx.rank_of(node.input[0]), "axes")
    if axes == value.reshape(-1).tolist():
        return [node]
    const, name = ctx.constant(np.array(axes, dtype=value.dtype),
                               base=f"{node.name or 'Slice'}/axes")
    out = _copy(node)
    out.input[3] = name
    return [const, out]


@adapter("Gather", 11)
def gather(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Gather 11 -> 10: negative indices counted from the back of the gathered axis.

    A negative ``axis`` is made non-negative when the rank is known (opset 1
    already allowed it otherwise).  Constant indices with no negative value
    cross as they are; constant negative indices over an axis of known length
    become a new constant; any other indices get ``i + dim * (i < 0)`` in front
    of the Gather, with dim read by Shape and Gather at run time.
    """
    axis = int(attribute(node, "axis", 0))
    rank = ctx.rank_of(node.input[0])
    out = _copy(node)
    if axis < 0 and rank is not None:
        axis = normalise([axis], rank, "axis")[0]
        _set(out, "axis", axis)
    base = node.name or "Gather"
    indices = ctx.value_of(node.input[1])
    if indices is not None and not (indices < 0).any():
        return [out]
    shape = ctx.shape_of(node.input[0])
    dim = None
    if shape is not None and -len(shape) <= axis < len(shape):
        dim = shape[axis]
    if indices is not None and dim is not None:
        if ((indices < -dim) | (indices >= dim)).any():
            raise Refusal(f"constant indices are out of range for an axis of length {dim}")
        const, name = ctx.constant(np.where(indices < 0, indices + dim, indices)
                                   .astype(indices.dtype), base=f"{base}/indices")
        out.input[1] = name
        return [const, out]
    elem = ctx.elem_type(node.input[1])
    if elem not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
        raise Refusal("the element type of the indices is unknown, so they cannot be made "
                      "non-negative (opset 10's Gather takes no negative index)")
    if axis < 0:
        raise Refusal(f"axis {axis} counts from the back of an input of unknown rank, so the "
                      "length negative indices count from cannot be read")
    shape_node = ctx.node("Shape", [node.input[0]], base=f"{base}/shape")
    # a scalar index: the length comes out a scalar, and scalar indices stay scalar
    axis_const, axis_name = ctx.constant(np.array(axis, dtype=np.int64), base=f"{base}/axis")
    dim_node = ctx.node("Gather", [shape_node.output[0], axis_name], base=f"{base}/dim", axis=0)
    fixed, name = _from_the_front(ctx, node.input[1], dim_node.output[0], elem, base)
    out.input[1] = name
    return [shape_node, axis_const, dim_node, *fixed, out]


def _from_the_front(ctx: StepContext, indices: str, length: str, elem: int, base: str,
                    cast_length: bool = True) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing ``i + length * (i < 0)`` for *indices* of element type *elem*.

    *length* is an int64 scalar (of type *elem* already when not
    *cast_length*).  Returns the nodes and the name of the result,
    of type *elem*.  Arithmetic rather than Where: Where and Less on integers
    exist only from 9, while Cast, Less on floats, Mul and Add are valid down
    to 7.  Casting an index to float keeps its sign exactly, whatever its size.
    """
    made: list[onnx.NodeProto] = []
    if cast_length and elem != onnx.TensorProto.INT64:
        cast = ctx.node("Cast", [length], base=f"{base}/length", to=elem)
        made.append(cast)
        length = cast.output[0]
    as_float = ctx.node("Cast", [indices], base=f"{base}/indices_float",
                        to=onnx.TensorProto.FLOAT)
    zero_const, zero = ctx.constant(np.array(0, dtype=np.float32), base=f"{base}/zero")
    negative = ctx.node("Less", [as_float.output[0], zero], base=f"{base}/negative")
    flag = ctx.node("Cast", [negative.output[0]], base=f"{base}/negative", to=elem)
    shift = ctx.node("Mul", [flag.output[0], length], base=f"{base}/shift")
    fixed = ctx.node("Add", [indices, shift.output[0]], base=f"{base}/indices")
    made += [as_float, zero_const, negative, flag, shift, fixed]
    return made, fixed.output[0]


@adapter("OneHot", 11)
def onehot(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """OneHot 11 -> 10: a negative ``axis`` made non-negative; negative indices from the front.

    Opset 10 allows axis -1 (the last) and non-negative axes; any other
    negative axis counts in the output's rank, one more than the indices'.
    Below 11 a negative index gives all off values instead of counting from
    the back: constant indices with no negative value cross as they are,
    other indices get ``i + depth * (i < 0)`` in front (after the cast to
    int64 both opsets apply to non-integer indices and depth, so the sum is
    what opset 11 would look up), and one still negative is set to depth.
    Raises Refusal when the element type of the indices is unknown, or an
    axis is out of range or of unknown rank.
    """
    out = _copy(node)
    axis = int(attribute(node, "axis", -1))
    if axis < -1:
        rank = ctx.rank_of(node.input[0])
        _set(out, "axis", normalise([axis], None if rank is None else rank + 1, "axis")[0])
    indices = ctx.value_of(node.input[0])
    if indices is not None and not (indices < 0).any():
        return [out]
    elem = ctx.elem_type(node.input[0])
    if elem is None:
        raise Refusal(f"the element type of indices {node.input[0]!r} is unknown, so negative "
                      "ones (all off values below opset 11) cannot be counted from the back")
    base = node.name or "OneHot"
    made: list[onnx.NodeProto] = []
    i = node.input[0]
    if elem not in (onnx.TensorProto.INT32, onnx.TensorProto.INT64):
        # truncate as the op's own cast to int64 does, then count in the indices' type
        truncated = ctx.node("Cast", [i], base=f"{base}/indices_int", to=onnx.TensorProto.INT64)
        back = ctx.node("Cast", [truncated.output[0]], base=f"{base}/indices", to=elem)
        made += [truncated, back]
        i = back.output[0]
    empty_const, empty = ctx.constant(np.zeros((0,), dtype=np.int64), base=f"{base}/scalar")
    scalar = ctx.node("Reshape", [node.input[1], empty], base=f"{base}/depth")
    depth = ctx.node("Cast", [scalar.output[0]], base=f"{base}/depth", to=onnx.TensorProto.INT64)
    made += [empty_const, scalar, depth]
    length = depth.output[0]
    if elem != onnx.TensorProto.INT64:
        cast = ctx.node("Cast", [length], base=f"{base}/depth", to=elem)
        made.append(cast)
        length = cast.output[0]
    fixed, name = _from_the_front(ctx, i, length, elem, base, cast_length=False)
    # An index below -depth is off at 11 but still negative here; ONNX Runtime
    # reads a negative index from the back at every opset, so it is moved to
    # depth, which is off under either reading.
    as_float = ctx.node("Cast", [name], base=f"{base}/fixed_float", to=onnx.TensorProto.FLOAT)
    zero_const, zero = ctx.constant(np.array(0, dtype=np.float32), base=f"{base}/zero")
    below = ctx.node("Less", [as_float.output[0], zero], base=f"{base}/below")
    flag = ctx.node("Cast", [below.output[0]], base=f"{base}/below", to=elem)
    gap = ctx.node("Sub", [length, name], base=f"{base}/gap")
    shift = ctx.node("Mul", [flag.output[0], gap.output[0]], base=f"{base}/off")
    off = ctx.node("Add", [name, shift.output[0]], base=f"{base}/indices")
    fixed += [as_float, zero_const, below, flag, gap, shift, off]
    out.input[0] = off.output[0]
    return [*made, *fixed, out]
