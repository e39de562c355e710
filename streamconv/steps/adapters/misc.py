"""Resize 10, ConstantOfShape 9, RoiAlign 16, (De)QuantizeLinear 13, legacy broadcast 7, RNNs 7.

One adapter family each, too small for a module of their own:

- Resize 10 -> 9 is Upsample 9: same inputs, same modes, same (asymmetric)
  coordinate mapping.
- ConstantOfShape 9 -> 8 is Expand 8 of a scalar Constant.
- RoiAlign 16 -> 15 keeps only ``output_half_pixel``, the one mapping opset 10
  has.
- DequantizeLinear and QuantizeLinear 13 -> 12 keep only per-tensor scales.
- And, Or, Xor, Equal, Greater, Less 7 -> 6 trade numpy-style broadcasting for
  the legacy ``broadcast=1`` (B's shape a suffix of A's).
- GRU, LSTM, RNN 7 -> 6 ask for Y with ``output_sequence=1`` when Y is used.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute, tensor_value, without

__all__ = ["constant_of_shape", "legacy_broadcast", "quantize_per_tensor", "recurrent_sequence",
           "resize", "roi_align"]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def _type_name(elem: int) -> str:
    try:
        return str(onnx.TensorProto.DataType.Name(elem))
    except ValueError:  # a number no onnx type has
        return f"undefined type {elem}"


@adapter("Resize", 10)
def resize(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Resize 10 -> 9: the same node as Upsample 9.

    Raises Refusal when constant scales hold a value below 1: opset 9's
    Upsample takes scales >= 1 only.  Scales computed at run time cross
    unchecked (most are upsampling factors; a runtime rejects a smaller one).
    """
    scales = ctx.value_of(node.input[1]) if len(node.input) > 1 else None
    if scales is not None and (scales < 1).any():
        raise Refusal(f"scales {scales.reshape(-1).tolist()} sample down, and opset 9's "
                      "Upsample takes scales >= 1 only")
    out = _copy(node)
    out.op_type = "Upsample"
    return [out]


#: element types a Constant may hold below opset 9
_CONSTANT_8 = {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}


@adapter("ConstantOfShape", 9)
def constant_of_shape(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """ConstantOfShape 9 -> 8: Expand 8 of a scalar Constant holding ``value``.

    ``value`` defaults to a float 0.  Constant holds only float16, float and
    double below 9, so another element type is held as a double and Cast;
    raises Refusal when the double would not hold the value exactly, or for
    a type Cast cannot make (strings).
    """
    given = attribute(node, "value")
    elem: int
    if given is None:
        value = np.zeros((), dtype=np.float32)
        elem = onnx.TensorProto.FLOAT
    else:
        value = tensor_value(given, "value")
        if value.size != 1:
            raise Refusal(f"value holds {value.size} elements; ConstantOfShape takes one")
        value = value.reshape(())
        elem = int(given.data_type)
    base = node.name or "ConstantOfShape"
    made: list[onnx.NodeProto] = []
    if elem in _CONSTANT_8:
        const, scalar = ctx.constant(value, base=f"{base}/value")
        made.append(const)
    else:
        if value.dtype.kind not in "biuf":
            raise Refusal(f"value of type {_type_name(elem)} cannot be "
                          "made at opset 8 (Constant holds only floats there, and Cast no "
                          "strings)")
        held = value.astype(np.float64)
        if held.astype(value.dtype) != value:
            raise Refusal(f"value {value.item()} is not exactly a double, and a Constant "
                          "holds only floats at opset 8")
        const, as_double = ctx.constant(held, base=f"{base}/value")
        cast = ctx.node("Cast", [as_double], base=f"{base}/value", to=elem)
        made += [const, cast]
        scalar = cast.output[0]
    expand = ctx.node("Expand", [scalar, node.input[0]], list(node.output), base=base)
    expand.name = node.name or expand.name
    expand.doc_string = node.doc_string
    expand.metadata_props.extend(node.metadata_props)
    return [*made, expand]


@adapter("RoiAlign", 16)
def roi_align(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """RoiAlign 16 -> 15: ``coordinate_transformation_mode`` output_half_pixel is dropped.

    Raises Refusal for any other mode (including the default half_pixel):
    opset 10's RoiAlign always maps with output_half_pixel.
    """
    mode = attribute(node, "coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode != "output_half_pixel":
        raise Refusal(f"coordinate_transformation_mode={mode!r}: opset 15's RoiAlign always "
                      "maps coordinates as output_half_pixel (no half-pixel offset)")
    return [without(node, "coordinate_transformation_mode")]


@adapter("DequantizeLinear", 13)
@adapter("QuantizeLinear", 13)
def quantize_per_tensor(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """(De)QuantizeLinear 13 -> 12: per-tensor scale and zero point only; ``axis`` dropped.

    A one-element scale or zero point is reshaped to the scalar opset 12
    asks for.  Raises Refusal when either has more than one element (a
    per-axis quantization) or its shape is unknown.
    """
    out = without(node, "axis")
    made: list[onnx.NodeProto] = []
    base = node.name or node.op_type
    for index, what in ((1, "scale"), (2, "zero point")):
        if index >= len(node.input) or not node.input[index]:
            continue
        name = node.input[index]
        value = ctx.value_of(name)
        shape = list(value.shape) if value is not None else ctx.shape_of(name)
        if shape is None or any(d is None for d in shape):
            raise Refusal(f"the shape of the {what} {name!r} is unknown, and opset 12 "
                          "quantizes per tensor only (a scalar)")
        size = math.prod(int(d) for d in shape if d is not None)
        if size != 1:
            raise Refusal(f"the {what} has {size} elements (per-axis quantization), and "
                          "opset 12 quantizes per tensor only (a scalar)")
        if not shape:
            continue
        if value is not None:
            const, scalar = ctx.constant(value.reshape(()), base=f"{base}/{what.replace(' ', '_')}")
            made.append(const)
        else:
            shape_const, empty = ctx.constant(np.zeros((0,), dtype=np.int64),
                                              base=f"{base}/scalar_shape")
            reshape = ctx.node("Reshape", [name, empty], base=f"{base}/scalar")
            made += [shape_const, reshape]
            scalar = reshape.output[0]
        out.input[index] = scalar
    return [*made, out]


def _dims(ctx: StepContext, name: str) -> list[int | str | None] | None:
    """Dimensions of *name*: a number, a symbolic name, or None when nothing is known."""
    t = ctx.type_of(name)
    if t is None or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value")
            else (d.dim_param if d.HasField("dim_param") else None)
            for d in t.tensor_type.shape.dim]


def _suffix(a: list[int | str | None], b: list[int | str | None]) -> bool:
    """Whether legacy broadcasting of B over A gives numpy's result: B a suffix of A."""
    if len(b) > len(a):
        return False
    if all(d == 1 for d in b):
        return True  # a scalar or one-element B
    tail = a[len(a) - len(b):]
    return all(x is not None and x == y for x, y in zip(tail, b, strict=True))


#: the op computing the same with A and B swapped
_SWAPPED = {"And": "And", "Or": "Or", "Xor": "Xor", "Equal": "Equal",
            "Greater": "Less", "Less": "Greater"}


@adapter("And", 7)
@adapter("Or", 7)
@adapter("Xor", 7)
@adapter("Equal", 7)
@adapter("Greater", 7)
@adapter("Less", 7)
def legacy_broadcast(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """And/Or/Xor/Equal/Greater/Less 7 -> 6: numpy-style broadcasting as legacy broadcast.

    Equal shapes cross unchanged; B's shape a suffix of A's (or B one
    element) sets ``broadcast=1``; A's a suffix of B's swaps the inputs (Greater
    and Less trade places).  Raises Refusal for any other broadcast and when a
    shape is unknown.
    """
    a, b = _dims(ctx, node.input[0]), _dims(ctx, node.input[1])
    if a is None or b is None:
        raise Refusal("an input's shape is unknown, and opset 6 broadcasts only B over A "
                      "with B's shape a suffix of A's")
    if a == b and None not in a:
        return [node]
    out = _copy(node)
    if not _suffix(a, b):
        if not _suffix(b, a):
            raise Refusal(f"shapes {a} and {b} broadcast numpy-style, and opset 6 broadcasts "
                          "only B over A with B's shape a suffix of A's")
        out.op_type = _SWAPPED[node.op_type]
        out.input[0], out.input[1] = node.input[1], node.input[0]
    out.attribute.append(helper.make_attribute("broadcast", 1))
    return [out]


@adapter("GRU", 7)
@adapter("LSTM", 7)
@adapter("RNN", 7)
def recurrent_sequence(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """GRU/LSTM/RNN 7 -> 6: ``output_sequence=1`` when the Y output is used.

    Below 7, Y (every step's hidden state) is filled only on request.
    """
    if not node.output or not node.output[0]:
        return [node]
    out = without(node, "output_sequence")
    out.attribute.append(helper.make_attribute("output_sequence", 1))
    return [out]
