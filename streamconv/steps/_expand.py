"""Replace a node by the function body onnx's schema defines for its op.

Used for ops that do not exist below the opset they were introduced at
(LayerNormalization below 17, Gelu below 20, …).  The body comes from
``onnx.defs`` (``get_function_with_opset_version`` or, for context-dependent
functions, the variant that takes the node and its input types), never from
a decomposition written here.  Names inside the body are made unique in the
model; attribute references take the node's attributes or the schema's
defaults; the node's metadata goes onto the nodes producing its outputs.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from ._context import Refusal, StepContext
from ._schema import schema_at

__all__ = ["expand_function"]

_DEFAULT = ("", "ai.onnx")


def _body(node: onnx.NodeProto, version: int, ctx: StepContext) -> onnx.FunctionProto:
    found = schema_at(node.op_type, version)
    if found is None:
        raise Refusal(f"onnx has no schema for {node.op_type} at opset {version}")
    schema: Any = found  # onnx's type stubs lack the function-body methods
    data = b""
    if schema.has_function:
        data = schema.get_function_with_opset_version(version)
    if not data and schema.has_context_dependent_function:
        types = []
        for name in node.input:
            t = ctx.type_of(name) if name else onnx.TypeProto()
            if name and (t is None or not t.WhichOneof("value")):
                raise Refusal(f"onnx's function body for {node.op_type} needs the type of "
                              f"input {name!r}, which shape inference could not tell")
            types.append((t or onnx.TypeProto()).SerializeToString())
        try:
            data = schema.get_context_dependent_function_with_opset_version(
                version, node.SerializeToString(), types)
        except Exception as e:  # onnx's builder rejects inputs it cannot expand
            raise Refusal(f"onnx cannot build the function body of {node.op_type}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else e}") from e
    if not data:
        raise Refusal(f"onnx defines no function body for {node.op_type} at opset {version}")
    fn = onnx.FunctionProto.FromString(data)
    body_version = next((o.version for o in fn.opset_import if o.domain in _DEFAULT), version)
    if body_version != version:
        raise Refusal(f"onnx's function body for {node.op_type} is written for opset "
                      f"{body_version}, not {version}")
    if any(n.domain not in _DEFAULT for n in fn.node):
        raise Refusal(f"onnx's function body for {node.op_type} uses other domains")
    return fn


def _resolve(attr: onnx.AttributeProto, given: dict[str, onnx.AttributeProto],
             defaults: dict[str, onnx.AttributeProto]) -> onnx.AttributeProto | None:
    if not attr.ref_attr_name:
        return attr
    source = given.get(attr.ref_attr_name) or defaults.get(attr.ref_attr_name)
    if source is None:
        return None  # neither set nor defaulted: the body node goes without it
    out = onnx.AttributeProto()
    out.CopyFrom(source)
    out.name = attr.name
    return out


def _rename_graph(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Rename outer-scope references inside a subgraph of the body (its own names stay)."""
    for node in graph.node:
        node.input[:] = [names.get(n, n) for n in node.input]
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_graph(a.g, names)
            for g in a.graphs:
                _rename_graph(g, names)


def expand_function(node: onnx.NodeProto, version: int, ctx: StepContext) -> list[onnx.NodeProto]:
    """The nodes (valid at *version*) of *op*'s function body, wired to *node*'s values."""
    fn = _body(node, version, ctx)
    schema = schema_at(node.op_type, version)
    assert schema is not None
    names: dict[str, str] = {}
    for formal, actual in zip(fn.input, node.input, strict=False):
        names[formal] = actual
    for formal in fn.input[len(node.input):]:
        names[formal] = ""
    for i, formal in enumerate(fn.output):
        actual = node.output[i] if i < len(node.output) else ""
        names[formal] = actual or ctx.fresh(f"{node.name or node.op_type}_{formal}")
    base = node.name or node.op_type
    given = {a.name: a for a in node.attribute}
    defaults = {k: v.default_value for k, v in schema.attributes.items() if v.default_value.name}
    out: list[onnx.NodeProto] = []
    for body_node in fn.node:
        for name in body_node.output:
            if name and name not in names:
                names[name] = ctx.fresh(f"{base}/{name}")
    produced = set(node.output) - {""}
    for body_node in fn.node:
        new = onnx.NodeProto()
        new.CopyFrom(body_node)
        new.domain = ""
        new.name = ctx.fresh(f"{base}/{body_node.op_type}")
        new.input[:] = [names.get(n, n) if n else "" for n in body_node.input]
        new.output[:] = [names[n] if n else "" for n in body_node.output]
        del new.attribute[:]
        for attr in body_node.attribute:
            resolved = _resolve(attr, given, defaults)
            if resolved is None:
                continue
            if resolved.type == onnx.AttributeProto.GRAPH:
                _rename_graph(resolved.g, names)
            for g in resolved.graphs:
                _rename_graph(g, names)
            new.attribute.append(resolved)
        if produced & set(new.output):
            new.metadata_props.extend(node.metadata_props)
            if node.doc_string:
                new.doc_string = node.doc_string
        out.append(new)
    for i, formal in enumerate(fn.output):
        actual = node.output[i] if i < len(node.output) else ""
        if actual and not any(actual in n.output for n in out):
            # an output the body passes through from an input
            out.append(helper.make_node("Identity", [names.get(formal, formal)], [actual],
                                        name=ctx.fresh(f"{base}/Identity")))
    return out
