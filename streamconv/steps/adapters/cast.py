"""Cast/CastLike 19 -> 18 (saturate), Constant 12 -> 11 (value_* attributes), Constant 9 -> 8.

- 19 added the float8 types and ``saturate``, which only affects casts to
  float8.  With no float8 type involved the attribute changes nothing and is
  dropped (onnx's adapter keeps it, which makes an invalid model); casts
  from or to float8 have no equivalent below 19.
- 12 added ``value_float(s)``, ``value_int(s)`` and ``value_string(s)``: they
  become the ``value`` tensor they stand for (a scalar, or a 1-D tensor).
- Below 9 a Constant holds only float16, float or double.  Any other value is
  written as a float (or double) Constant followed by a Cast to its own type,
  when every value survives that round trip exactly.  onnx's adapter leaves
  such values, which makes an invalid model.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .._context import Refusal, StepContext, adapter, attribute, tensor_value, without
from .._schema import fit_or_refuse

_FLOAT8 = {
    TensorProto.FLOAT8E4M3FN,
    TensorProto.FLOAT8E4M3FNUZ,
    TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
#: what a Constant may hold below opset 9
_OLD_CONSTANT_TYPES = {TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE}
#: what Cast (opset 6 to 8) casts to, besides the float types
_OLD_CAST_TARGETS = {
    TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
    TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64,
}



def _type_name(elem_type: int) -> str:
    try:
        return str(TensorProto.DataType.Name(elem_type)).lower()
    except ValueError:  # a number no onnx type has
        return f"undefined type {elem_type}"


def _no_float8(node: onnx.NodeProto, ctx: StepContext, types: dict[str, int | None]) -> None:
    """Refuse when a float8 type is involved, or when a type that could be one is unknown."""
    for what, elem_type in types.items():
        if elem_type is None:
            raise Refusal(f"the type of {what} is unknown, and {node.op_type} below 19 has "
                          "no float8 types")
        if elem_type in _FLOAT8:
            raise Refusal(f"{what} is {_type_name(elem_type)}: float8 types exist only from "
                          "opset 19")


@adapter("Cast", 19)
def cast_without_saturate(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Cast 19 -> 18: saturate dropped when neither side is float8."""
    to = attribute(node, "to")
    _no_float8(node, ctx, {f"input {node.input[0]!r}": ctx.elem_type(node.input[0]),
                           "the target type (to)": None if to is None else int(to)})
    return [fit_or_refuse(without(node, "saturate"), ctx)]


@adapter("CastLike", 19)
def castlike_without_saturate(node: onnx.NodeProto, ctx: StepContext
                              ) -> list[onnx.NodeProto]:
    """CastLike 19 -> 18: saturate dropped when neither side is float8."""
    _no_float8(node, ctx, {f"input {node.input[0]!r}": ctx.elem_type(node.input[0]),
                           f"the target type (input {node.input[1]!r})":
                               ctx.elem_type(node.input[1])})
    return [fit_or_refuse(without(node, "saturate"), ctx)]


#: Constant-12 attribute -> (element type, whether it is a list)
_VALUE_ATTRIBUTES = {
    "value_float": (TensorProto.FLOAT, False),
    "value_floats": (TensorProto.FLOAT, True),
    "value_int": (TensorProto.INT64, False),
    "value_ints": (TensorProto.INT64, True),
    "value_string": (TensorProto.STRING, False),
    "value_strings": (TensorProto.STRING, True),
}


@adapter("Constant", 12)
def value_attribute_to_tensor(node: onnx.NodeProto, ctx: StepContext
                              ) -> list[onnx.NodeProto]:
    """Constant 12 -> 11: a value_* attribute becomes the value tensor it stands for."""
    for attr in node.attribute:
        spec = _VALUE_ATTRIBUTES.get(attr.name)
        if spec is None:
            continue
        elem_type, is_list = spec
        value = helper.get_attribute_value(attr)
        values = list(value) if is_list else [value]
        dims = [len(values)] if is_list else []
        tensor = helper.make_tensor(node.output[0], elem_type, dims, values)
        out = without(node, attr.name)
        out.attribute.append(helper.make_attribute("value", tensor))
        return [out]
    return [node]


def _as_float(values: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Integer *values* as float32 (or else float64) when every one is held exactly."""
    wanted = [int(v) for v in values.reshape(-1).tolist()]
    for dtype, elem_type in ((np.float32, int(TensorProto.FLOAT)),
                             (np.float64, int(TensorProto.DOUBLE))):
        floats: np.ndarray = values.astype(dtype)
        # compared as Python integers: large values round on the way to float
        if all(int(f) == v for f, v in zip(floats.reshape(-1).tolist(), wanted, strict=True)):
            return floats, elem_type
    return None


@adapter("Constant", 9)
def value_as_float_then_cast(node: onnx.NodeProto, ctx: StepContext
                             ) -> list[onnx.NodeProto]:
    """Constant 9 -> 8: a non-float value as a float Constant and a Cast to its type."""
    tensor = attribute(node, "value")
    if not isinstance(tensor, TensorProto):
        raise Refusal("Constant below 9 needs a value tensor")
    elem_type = int(tensor.data_type)
    if elem_type in _OLD_CONSTANT_TYPES:
        return [node]
    name = _type_name(elem_type)
    if elem_type not in _OLD_CAST_TARGETS:
        raise Refusal(f"a {name} value has no equivalent below 9 (Constant held only "
                      "float16, float or double, and Cast could not make a " + name + ")")
    if tensor.data_location == TensorProto.EXTERNAL:
        raise Refusal(f"the {name} value is not in the skeleton, so it cannot be checked "
                      "and rewritten as a float constant (Constant below 9 holds only "
                      "float16, float or double)")
    values = tensor_value(tensor, f"{name} value")
    float_type: int
    if elem_type == TensorProto.BOOL:
        floats, float_type = values.astype(np.float32), int(TensorProto.FLOAT)
    else:
        found = _as_float(values)
        if found is None:
            raise Refusal(f"the {name} value is not exactly representable as a double, and "
                          "Constant below 9 holds only float16, float or double")
        floats, float_type = found
    base = node.name or "Constant"
    float_name = ctx.fresh(f"{base}/as_{_type_name(float_type)}")
    as_float = helper.make_node(
        "Constant", [], [float_name], name=ctx.fresh(f"{base}/as_float"),
        value=numpy_helper.from_array(floats, name=float_name))
    cast = without(node, "value")
    cast.op_type = "Cast"
    del cast.input[:]
    cast.input.append(float_name)
    cast.attribute.append(helper.make_attribute("to", elem_type))
    return [as_float, cast]
