"""AveragePool 19 -> 18: the attribute dilations.

Below 19 AveragePool has no dilations: it crosses when every dilation is 1
(onnx's own adapter keeps the attribute, which makes an invalid model).
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse


@adapter("AveragePool", 19)
def drop_unit_dilations(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """AveragePool 19 -> 18: dilations dropped when all are 1."""
    dilations = attribute(node, "dilations")
    if dilations is not None and any(int(d) != 1 for d in dilations):
        raise Refusal(f"dilations={list(dilations)} has no equivalent below 19")
    return [fit_or_refuse(without(node, "dilations"), ctx)]
