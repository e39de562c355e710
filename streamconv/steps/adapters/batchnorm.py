"""BatchNormalization 14 -> 13: the attribute training_mode.

Opset 14 made training explicit (``training_mode=1``, with the outputs
running_mean and running_var) and let mean/var have their own type.  Below
14 the same computation in inference mode is the node with only its Y
output; training mode is refused.
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse


@adapter("BatchNormalization", 14)
def inference_only(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    """BatchNormalization 14 -> 13: inference-mode nodes cross without training_mode."""
    training = int(attribute(node, "training_mode", 0))
    if training:
        raise Refusal(f"training_mode={training} (normalising with the batch's statistics "
                      "and updating the running ones) has no equivalent below 14")
    extra = [name for name in node.output[1:] if name]
    if extra:
        raise Refusal(f"outputs {', '.join(map(repr, extra))} (running mean and variance) "
                      "exist only in training mode, which has no equivalent below 14")
    out = without(node, "training_mode")
    del out.output[1:]
    return [fit_or_refuse(out, ctx)]
