"""Pad 19 -> 18 (mode wrap), 18 -> 17 (axes input), 11 -> 10 (inputs back to attributes),
2 -> 1 (pads renamed).

- 19 added ``mode='wrap'``, which no older Pad has (onnx's adapter keeps it,
  which makes an invalid model that the checker does not see).
- 18 added an optional ``axes`` input: ``pads`` then covers only those axes.
  Below 18 ``pads`` covers every axis, so the pads of the named axes are
  spread over a full-rank pads tensor (zeros elsewhere).  That needs the axes
  as a constant and the rank of the data.
- 11 moved ``pads`` and ``value`` from attributes to inputs (``pads``,
  ``constant_value``); going back needs both as constants.
- 2 renamed the attribute ``paddings`` (opset 1) to ``pads``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse


def _trimmed(node: onnx.NodeProto, count: int) -> onnx.NodeProto:
    """A copy of *node* with at most its first *count* inputs (trailing empty ones dropped)."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    inputs = list(node.input[:count])
    while inputs and not inputs[-1]:
        inputs.pop()
    del out.input[:]
    out.input.extend(inputs)
    return out


def _no_wrap(node: onnx.NodeProto) -> None:
    """Refuse mode 'wrap', which no Pad below 19 has.

    Checked at every Pad step: a model may already carry it below 19 (onnx's
    own 19 -> 18 adapter writes such models, and the checker lets them pass).
    """
    mode = attribute(node, "mode", b"constant")
    if mode in (b"wrap", "wrap"):
        raise Refusal("mode 'wrap' exists only from opset 19")


def _normalised_axes(axes: np.ndarray, rank: int) -> list[int]:
    out = []
    for a in axes.reshape(-1).tolist():
        a = int(a)
        if not -rank <= a < rank:
            raise Refusal(f"axis {a} is out of range for an input of rank {rank}")
        out.append(a + rank if a < 0 else a)
    if len(set(out)) != len(out):
        raise Refusal(f"axes {axes.reshape(-1).tolist()} name an axis twice")
    return out


@adapter("Pad", 19)
def refuse_wrap(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Pad 19 -> 18: unchanged, unless the mode is wrap."""
    _no_wrap(node)
    return [fit_or_refuse(node, ctx)]


@adapter("Pad", 18)
def axes_to_full_pads(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Pad 18 -> 17: pads for the listed axes become pads for every axis."""
    _no_wrap(node)
    if len(node.input) < 4 or not node.input[3]:
        return [fit_or_refuse(_trimmed(node, 3), ctx)]
    data, pads, axes_name = node.input[0], node.input[1], node.input[3]
    axes_value = ctx.value_of(axes_name)
    if axes_value is None:
        raise Refusal(f"the axes input {axes_name!r} is not a constant, and Pad below 18 "
                      "needs pads for every axis")
    rank = ctx.rank_of(data)
    if rank is None:
        raise Refusal(f"the rank of input {data!r} is unknown, and Pad below 18 needs pads "
                      "for every axis")
    axes = _normalised_axes(axes_value, rank)
    base = node.name or "Pad"
    made: list[onnx.NodeProto] = []
    pads_value = ctx.value_of(pads)
    if pads_value is not None:
        flat = pads_value.reshape(-1).astype(np.int64)
        if flat.size != 2 * len(axes):
            raise Refusal(f"pads holds {flat.size} values for {len(axes)} axes "
                          f"(it needs {2 * len(axes)})")
        full = np.zeros(2 * rank, dtype=np.int64)
        for i, a in enumerate(axes):
            full[a] = flat[i]
            full[a + rank] = flat[i + len(axes)]
        const, full_name = ctx.constant(full, base=f"{base}/pads")
        made.append(const)
    else:
        # pads computed at run time: scatter them into zeros at the axes' places
        zeros, zeros_name = ctx.constant(np.zeros(2 * rank, dtype=np.int64),
                                         base=f"{base}/no_pads")
        places, places_name = ctx.constant(
            np.array(axes + [a + rank for a in axes], dtype=np.int64), base=f"{base}/pad_places")
        scatter = ctx.node("ScatterElements", [zeros_name, places_name, pads],
                           base=f"{base}/pads", axis=0)
        full_name = scatter.output[0]
        made.extend([zeros, places, scatter])
    out = _trimmed(node, 3)
    out.input[1] = full_name
    return [*made, fit_or_refuse(out, ctx)]


def _constant_input(ctx: StepContext, name: str, what: str) -> np.ndarray:
    value = ctx.value_of(name)
    if value is None:
        raise Refusal(f"the {what} input {name!r} is not a constant, and Pad below 11 takes "
                      f"{what} as an attribute")
    return value


@adapter("Pad", 11)
def inputs_to_attributes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Pad 11 -> 10: constant pads and constant_value inputs become attributes."""
    _no_wrap(node)
    pads = _constant_input(ctx, node.input[1], "pads").reshape(-1).astype(np.int64)
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        array = _constant_input(ctx, node.input[2], "constant_value")
        if array.size != 1:
            raise Refusal(f"constant_value holds {array.size} values, not one")
        item = array.reshape(-1)[0]
        value = float(item)
        # the attribute is a 32-bit float: a value it rounds would pad differently
        if float(np.float32(value)) != value and not np.isnan(value):
            raise Refusal(f"constant_value {item.item()!r} is not exactly a 32-bit float, "
                          "which the attribute value of Pad below 11 is")
    out = without(_trimmed(node, 1), "pads", "value")
    out.attribute.append(helper.make_attribute("pads", pads.tolist()))
    if value != 0.0 or np.signbit(value):
        out.attribute.append(helper.make_attribute("value", value))
    return [fit_or_refuse(out, ctx)]


@adapter("Pad", 2)
def pads_to_paddings(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Pad 2 -> 1: the attribute pads is called paddings at opset 1."""
    _no_wrap(node)
    pads = attribute(node, "pads")
    if pads is None:
        raise Refusal("the node has no pads attribute")
    out = without(node, "pads")
    out.attribute.append(helper.make_attribute("paddings", list(pads)))
    return [fit_or_refuse(out, ctx)]
