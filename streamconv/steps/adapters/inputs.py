"""Inputs that were attributes before: Clip 11, Slice 10, TopK 10, Dropout 12.

Each of these steps moved a value from an attribute to an input.  Going down,
the input must be a constant kept in the skeleton so that its value can be
written back as the attribute; an input computed at run time has no
equivalent and is refused.  An absent optional input leaves the attribute
out, so the older schema's default applies (the same value).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, without
from .axes import normalise

__all__ = ["clip", "dropout", "slice_inputs", "topk"]


def _input(node: onnx.NodeProto, index: int) -> str:
    """The name of *node*'s input *index*, or "" when absent."""
    return node.input[index] if index < len(node.input) else ""


def _constant(ctx: StepContext, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    """The value of *node*'s input *index*; Refusal when it is not a constant."""
    name = _input(node, index)
    value = ctx.value_of(name)
    if value is None:
        raise Refusal(f"{what} {name!r} is not a constant, and opset {ctx.opset} takes it "
                      "only as an attribute")
    return value


def _replace(node: onnx.NodeProto, inputs: list[str], **attrs: object) -> onnx.NodeProto:
    """*node* with *inputs* and *attrs* set (attrs whose value is None are left out)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.input[:]
    out.input.extend(inputs)
    for name, value in attrs.items():
        if value is not None:
            out.attribute.append(helper.make_attribute(name, value))
    return out


def _scalar(value: np.ndarray, what: str) -> float:
    if value.size != 1:
        raise Refusal(f"{what} has {value.size} values, not one")
    return float(value.reshape(-1)[0])


@adapter("Clip", 11)
def clip(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Clip 11 -> 10: constant ``min`` and ``max`` inputs become attributes.

    Raises Refusal when a given bound is not a constant, and when min > max.
    """
    bounds: dict[str, float | None] = {}
    for index, name in ((1, "min"), (2, "max")):
        if _input(node, index):
            bounds[name] = _scalar(_constant(ctx, node, index, name), name)
        else:
            bounds[name] = None
    low, high = bounds["min"], bounds["max"]
    if low is not None and high is not None and low > high:
        # from 11 runtimes give max everywhere (onnx's reference does); opset 6's
        # Clip leaves it undefined and ONNX Runtime rejects such a node
        raise Refusal(f"min {low} is greater than max {high}, which opset 6's Clip leaves "
                      "undefined (ONNX Runtime rejects it)")
    return [_replace(node, [node.input[0]], **bounds)]


@adapter("Slice", 10)
def slice_inputs(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Slice 10 -> 9: constant ``starts``, ``ends`` and ``axes`` inputs become attributes.

    Raises Refusal when one of them is not a constant, and when ``steps`` is
    given and not all 1 (opset 9 slices with step 1 only).
    """
    starts = _constant(ctx, node, 1, "starts").reshape(-1).tolist()
    ends = _constant(ctx, node, 2, "ends").reshape(-1).tolist()
    axes = None
    if _input(node, 3):
        axes = _constant(ctx, node, 3, "axes").reshape(-1).tolist()
        if any(a < 0 for a in axes):
            # an opset-10 model may have been written with negative axes
            axes = normalise(axes, ctx.rank_of(node.input[0]), "axes")
    if _input(node, 4):
        steps = _constant(ctx, node, 4, "steps").reshape(-1).tolist()
        if any(s != 1 for s in steps):
            raise Refusal(f"steps {steps} are not all 1, and opset 9's Slice has no steps")
    return [_replace(node, [node.input[0]], starts=[int(s) for s in starts],
                     ends=[int(e) for e in ends],
                     axes=None if axes is None else [int(a) for a in axes])]


@adapter("TopK", 10)
def topk(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """TopK 10 -> 9: a constant ``K`` input becomes the attribute ``k``.

    Raises Refusal when K is not a constant.
    """
    k = _constant(ctx, node, 1, "K")
    if k.size != 1:
        raise Refusal(f"K has {k.size} values, not one")
    return [_replace(node, [node.input[0]], k=int(k.reshape(-1)[0]))]


@adapter("Dropout", 12)
def dropout(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Dropout 12 -> 11: a constant ``ratio`` becomes the attribute; inference mode only.

    ``training_mode`` must be absent or a constant false: opset 11 has no
    training input (whether it drops is up to the runtime).  ``seed`` is
    dropped: it only matters when dropping.  The mask at 12 is all true when
    not training, while opset 11 leaves the mask's value in inference mode
    unsaid, so a requested mask is made apart, as ones of the data's shape.
    Raises Refusal for a ratio that is not a constant, and for a training
    mode that is not a constant false.
    """
    if _input(node, 2):
        training = _constant(ctx, node, 2, "training_mode")
        if training.size != 1 or bool(training.reshape(-1)[0]):
            raise Refusal("training_mode is not false: opset 11's Dropout has no training "
                          "input, and training-mode dropout has no equivalent there")
    ratio = None
    if _input(node, 1):
        ratio = _scalar(_constant(ctx, node, 1, "ratio"), "ratio")
    out = _replace(without(node, "seed"), [node.input[0]], ratio=ratio)
    mask = node.output[1] if len(node.output) > 1 else ""
    if not mask:
        return [out]
    del out.output[1:]
    base = node.name or "Dropout"
    shape = ctx.node("Shape", [node.input[0]], base=f"{base}/shape")
    ones = ctx.node("ConstantOfShape", [shape.output[0]], [mask], base=f"{base}/mask",
                    value=helper.make_tensor("value", onnx.TensorProto.BOOL, [1], [True]))
    return [out, shape, ones]

