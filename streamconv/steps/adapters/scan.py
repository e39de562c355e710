"""Scan 9 -> 8: Scan 8 runs over a batch dimension that Scan 9 dropped.

onnx's own adapter gives the model's inputs a batch dimension, so the
converted model no longer takes the inputs the original takes.  Here the
values get the batch dimension of 1 on the way in (Unsqueeze) and lose it on
the way out (Squeeze), so the model keeps its inputs and outputs; the body is
the same in both versions (it never sees the batch dimension).
"""

from __future__ import annotations

import onnx
from onnx import helper

from .._context import Refusal, StepContext, adapter, attribute


@adapter("Scan", 9)
def scan_with_batch(node: onnx.NodeProto, ctx: StepContext) -> list[onnx.NodeProto]:
    axes_in = attribute(node, "scan_input_axes")
    axes_out = attribute(node, "scan_output_axes")
    if axes_in is not None and any(int(a) != 0 for a in axes_in):
        raise Refusal(f"scan_input_axes={list(axes_in)}: Scan 8 scans the first axis only")
    if axes_out is not None and any(int(a) != 0 for a in axes_out):
        raise Refusal(f"scan_output_axes={list(axes_out)}: Scan 8 stacks along the first axis "
                      "only")
    out_dirs = attribute(node, "scan_output_directions")
    if out_dirs is not None and any(int(d) != 0 for d in out_dirs):
        raise Refusal("scan_output_directions with a reverse output: Scan 8 stacks outputs "
                      "forwards only")
    base = node.name or "Scan"
    nodes: list[onnx.NodeProto] = []
    batched = [""]  # no sequence_lens: every batch entry runs the whole sequence
    for name in node.input:
        if not name:
            raise Refusal("an omitted input: Scan 8 takes every state and scan input")
        unsqueeze = ctx.node("Unsqueeze", [name], base=f"{base}/batched", axes=[0])
        nodes.append(unsqueeze)
        batched.append(unsqueeze.output[0])
    outputs = [ctx.fresh(f"{base}/batched_out") if o else "" for o in node.output]
    attrs = [a for a in node.attribute if a.name in ("body", "num_scan_inputs")]
    scan = helper.make_node("Scan", batched, outputs, name=node.name or ctx.fresh(base))
    scan.attribute.extend(attrs)
    in_dirs = attribute(node, "scan_input_directions")
    if in_dirs is not None:
        scan.attribute.append(helper.make_attribute("directions", [int(d) for d in in_dirs]))
    nodes.append(scan)
    for inner, outer in zip(outputs, node.output, strict=True):
        if outer:
            nodes.append(ctx.node("Squeeze", [inner], [outer], base=f"{base}/unbatched",
                                  axes=[0]))
    return nodes
