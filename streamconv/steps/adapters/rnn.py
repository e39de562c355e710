"""GRU, LSTM, RNN 14 -> 13: the attribute layout (batch-first tensors) becomes Transposes.

With ``layout=1`` the node's tensors are batch-first: X ``[batch, seq,
input]``, initial_h/initial_c and Y_h/Y_c ``[batch, num_directions,
hidden]``, Y ``[batch, seq, num_directions, hidden]``.  Below 14 only the
sequence-first layout exists (``[seq, batch, input]``, ``[num_directions,
batch, hidden]``, ``[seq, num_directions, batch, hidden]``), so the inputs are
transposed into it and the outputs back.  W, R, B, P and sequence_lens have
no batch axis and stay as they are.  ``layout=0`` is the old layout: the
attribute is dropped.
"""

from __future__ import annotations

import onnx

from .._context import Refusal, StepContext, adapter, attribute, without
from .._schema import fit_or_refuse

#: input positions holding batch-first tensors: X, initial_h, initial_c (LSTM only)
_BATCH_INPUTS = {0: [1, 0, 2], 5: [1, 0, 2], 6: [1, 0, 2]}
#: sequence-first output -> batch-first output, per position: Y, Y_h, Y_c (LSTM only)
_BATCH_OUTPUTS = {0: [2, 0, 1, 3], 1: [1, 0, 2], 2: [1, 0, 2]}



@adapter("GRU", 14)
@adapter("LSTM", 14)
@adapter("RNN", 14)
def batch_first_to_transposes(node: onnx.NodeProto, ctx: StepContext
                              ) -> list[onnx.NodeProto]:
    """GRU/LSTM/RNN 14 -> 13: layout=1 becomes layout 0 between Transposes."""
    layout = int(attribute(node, "layout", 0))
    out = without(node, "layout")
    if layout == 0:
        return [fit_or_refuse(out, ctx)]
    if layout != 1:
        raise Refusal(f"layout={layout} is neither 0 nor 1")
    base = node.name or node.op_type
    before: list[onnx.NodeProto] = []
    after: list[onnx.NodeProto] = []
    for i, name in enumerate(node.input):
        perm = _BATCH_INPUTS.get(i)
        if perm is None or not name:
            continue
        moved = ctx.node("Transpose", [name], base=f"{base}/seq_first", perm=perm)
        out.input[i] = moved.output[0]
        before.append(moved)
    for i, name in enumerate(node.output):
        perm = _BATCH_OUTPUTS.get(i)
        if perm is None or not name:
            continue
        seq_first = ctx.fresh(f"{base}/seq_first")
        out.output[i] = seq_first
        after.append(ctx.node("Transpose", [seq_first], [name], base=f"{base}/batch_first",
                              perm=perm))
    return [*before, fit_or_refuse(out, ctx), *after]
