"""Reshape 14 -> 13: the attribute allowzero.

With ``allowzero=1`` a 0 in ``shape`` means an empty dimension; below 14 a 0
always copies the input's dimension.  The two agree when the shape holds no
0, which can only be known when the shape is a constant.
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse


@adapter("Reshape", 14)
def drop_allowzero(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """Reshape 14 -> 13: allowzero dropped where it changes nothing."""
    allowzero = int(attribute(node, "allowzero", 0))
    if allowzero:
        shape = ctx.value_of(node.input[1])
        if shape is None:
            raise Refusal(f"allowzero={allowzero} with a shape ({node.input[1]!r}) that is "
                          "not a constant has no equivalent below 14 (a 0 in it would "
                          "mean an empty dimension)")
        if (shape == 0).any():
            raise Refusal(f"allowzero={allowzero} with a 0 in shape "
                          f"{shape.reshape(-1).tolist()} has no equivalent below 14")
    return [fit_or_refuse(without(node, "allowzero"), ctx)]
