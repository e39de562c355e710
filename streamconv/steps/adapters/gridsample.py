"""GridSample 20 -> 19: modes renamed, N-D inputs.

Opset 20 renamed the modes ``bilinear`` and ``bicubic`` to ``linear`` and
``cubic`` (``nearest`` kept its name) and allowed inputs of any rank; below
20 only 4-D inputs (N, C, H, W) exist.
"""

from __future__ import annotations

import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse

_OLD_MODES = {"linear": "bilinear", "cubic": "bicubic", "nearest": "nearest"}


@adapter("GridSample", 20)
def four_d_old_modes(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """GridSample 20 -> 19: the old mode names, only for 4-D inputs."""
    raw = attribute(node, "mode", b"linear")
    mode = raw.decode() if isinstance(raw, bytes) else str(raw)
    if mode not in _OLD_MODES:
        raise Refusal(f"mode {mode!r} is not a mode of GridSample 20")
    ranks = {r for r in (ctx.rank_of(node.input[0]), ctx.rank_of(node.input[1]))
             if r is not None}
    if not ranks:
        raise Refusal(f"the rank of input {node.input[0]!r} is unknown, and below 20 "
                      "GridSample takes only 4-D inputs")
    if ranks != {4}:
        raise Refusal(f"a {max(ranks)}-D input has no equivalent below 20 "
                      "(GridSample took only 4-D inputs)")
    out = without(node, "mode")
    out.attribute.append(helper.make_attribute("mode", _OLD_MODES[mode]))
    return [fit_or_refuse(out, ctx)]
