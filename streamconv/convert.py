"""Convert the skeleton with onnx's version converter, losing nothing.

onnx's ``convert_version`` drops model-local functions, training_info,
graph and node metadata_props, initializer doc strings and metadata,
quantization annotations and unknown fields, and fails on graphs with sparse
initializers.  :func:`convert_model` works around each: sparse initializers
are shown to the converter as dense placeholders, function bodies and
training graphs are converted on their own, and everything else is copied
back from the input by identity (node outputs, tensor names).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
import onnx.inliner
from onnx import defs, helper, version_converter

from .errors import ConversionError, UsageError

__all__ = [
    "DEFAULT_DOMAINS",
    "Converted",
    "convert_model",
    "default_opset",
    "max_opset",
    "validate_target",
]

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 1
PLACEHOLDER = "__streamconv_sparse__"


@dataclass
class Converted:
    """The converted skeleton and what conversion had to say."""

    model: onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def max_opset() -> int:
    """Newest ai.onnx opset the installed onnx knows."""
    return int(defs.onnx_opset_version())


def validate_target(opset: int) -> int:
    """Return *opset* if onnx can convert to it, else raise UsageError."""
    newest = max_opset()
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise UsageError(f"--opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET or opset > newest:
        raise UsageError(
            f"--opset must be between {MIN_OPSET} and {newest} "
            f"(the newest opset onnx {onnx.__version__} knows), got {opset}"
        )
    return opset


def _default_version(imports: object) -> int | None:
    versions = [o.version for o in imports if o.domain in DEFAULT_DOMAINS]  # type: ignore[attr-defined]
    return int(max(versions)) if versions else None


def default_opset(model: onnx.ModelProto) -> int:
    """The model's ai.onnx opset version; raises ConversionError if it has none."""
    version = _default_version(model.opset_import)
    if version is None:
        raise ConversionError("the model imports no ai.onnx opset, so there is nothing to convert")
    return version


def min_ir_version(opset: int) -> int:
    """Lowest IR version that can carry ai.onnx *opset*."""
    try:
        return int(helper.find_min_ir_version_for([helper.make_opsetid("", opset)], True))
    except Exception:  # an opset newer than onnx's table: leave the IR version alone
        return 0


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _run_converter(model: onnx.ModelProto, target: int, what: str) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(model, target)
    except Exception as e:  # onnx raises ConvertError, RuntimeError, ValueError…
        raise ConversionError(f"onnx's version converter failed on {what}: {_reason(e)}") from e


def _unknown_fields(message: object) -> bytes:
    """Wire bytes of the fields of *message* that its schema does not know."""
    probe = type(message)()  # type: ignore[operator]
    probe.CopyFrom(message)
    for descriptor in probe.DESCRIPTOR.fields:
        probe.ClearField(descriptor.name)
    return bytes(probe.SerializeToString())


def _carry_unknown(source: object, target: object) -> None:
    data = _unknown_fields(source)
    if data:
        target.MergeFromString(data)  # type: ignore[attr-defined]


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, int, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.name, -1, attr.g
        for i, g in enumerate(attr.graphs):
            yield attr.name, i, g


def _add_placeholders(graph: onnx.GraphProto) -> None:
    """Show sparse initializers to the converter as dense (data-less) initializers."""
    for sparse in graph.sparse_initializer:
        dense = graph.initializer.add()
        dense.name = sparse.values.name
        dense.dims.extend(sparse.dims)
        dense.data_type = sparse.values.data_type
        entry = dense.external_data.add()
        entry.key, entry.value = "location", PLACEHOLDER
        dense.data_location = onnx.TensorProto.EXTERNAL
    for node in graph.node:
        for _, _, g in _subgraphs(node):
            _add_placeholders(g)


def _restore_graph(orig: onnx.GraphProto, conv: onnx.GraphProto) -> None:
    """Copy back what the converter dropped from a graph, matching by identity."""
    kept = [
        t for t in conv.initializer
        if not any(e.key == "location" and e.value == PLACEHOLDER for e in t.external_data)
    ]
    if len(kept) != len(conv.initializer):
        del conv.initializer[:]
        conv.initializer.extend(kept)
    if orig.sparse_initializer and not conv.sparse_initializer:
        conv.sparse_initializer.extend(orig.sparse_initializer)
    if orig.metadata_props and not conv.metadata_props:
        conv.metadata_props.extend(orig.metadata_props)
    if orig.quantization_annotation and not conv.quantization_annotation:
        conv.quantization_annotation.extend(orig.quantization_annotation)
    if orig.doc_string and not conv.doc_string:
        conv.doc_string = orig.doc_string
    _carry_unknown(orig, conv)
    by_name = {t.name: t for t in orig.initializer}
    for t in conv.initializer:
        source = by_name.get(t.name)
        if source is None:
            continue
        if source.doc_string and not t.doc_string:
            t.doc_string = source.doc_string
        if source.metadata_props and not t.metadata_props:
            t.metadata_props.extend(source.metadata_props)
        _carry_unknown(source, t)
    _restore_nodes(orig.node, conv.node)


def _restore_nodes(orig_nodes: object, conv_nodes: object) -> None:
    by_outputs = {tuple(n.output): n for n in orig_nodes}  # type: ignore[attr-defined]
    for node in conv_nodes:  # type: ignore[attr-defined]
        source = by_outputs.get(tuple(node.output))
        if source is None:
            continue
        if source.metadata_props and not node.metadata_props:
            node.metadata_props.extend(source.metadata_props)
        if source.doc_string and not node.doc_string:
            node.doc_string = source.doc_string
        if source.name and not node.name:
            node.name = source.name
        _carry_unknown(source, node)
        originals = {(name, i): g for name, i, g in _subgraphs(source)}
        for name, i, g in _subgraphs(node):
            if (name, i) in originals:
                _restore_graph(originals[(name, i)], g)


def _graph_model(
    graph: onnx.GraphProto, imports: object, like: onnx.ModelProto
) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ir_version = like.ir_version
    model.opset_import.extend(imports)  # type: ignore[arg-type]
    model.graph.CopyFrom(graph)
    return model


def _convert_function(
    fn: onnx.FunctionProto, target: int, model: onnx.ModelProto
) -> onnx.FunctionProto:
    """Convert a function body to *target*; raise ConversionError naming the function."""
    out = onnx.FunctionProto()
    out.CopyFrom(fn)
    source = _default_version(fn.opset_import)
    if source is None or not fn.node:
        return out
    what = f"function {fn.domain}::{fn.name}"
    body = onnx.GraphProto()
    body.name = fn.name
    body.node.extend(fn.node)
    body.value_info.extend(getattr(fn, "value_info", []))
    for name in fn.input:
        body.input.add().name = name
    for name in fn.output:
        body.output.add().name = name
    if source != target:
        converted = _run_converter(_graph_model(body, fn.opset_import, model), target, what)
        _check_references(fn, converted.graph, what)
        del out.node[:]
        out.node.extend(converted.graph.node)
        _restore_nodes(fn.node, out.node)
    for imp in out.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = target
    return out


def _check_references(fn: onnx.FunctionProto, body: onnx.GraphProto, what: str) -> None:
    """Refuse bodies where the converter rewrote a node that uses attribute references."""
    by_outputs = {tuple(n.output): n for n in body.node}
    for node in fn.node:
        refs = [a.name for a in node.attribute if a.ref_attr_name]
        if not refs:
            continue
        new = by_outputs.get(tuple(node.output))
        same = (
            new is not None
            and new.op_type == node.op_type
            and list(new.input) == list(node.input)
            and sorted(a.SerializeToString() for a in new.attribute)
            == sorted(a.SerializeToString() for a in node.attribute)
        )
        if not same:
            raise ConversionError(
                f"cannot convert {what}: node {node.op_type} ({node.name or node.output[0]}) "
                f"takes attribute {refs[0]!r} from the caller, which onnx's converter cannot "
                "see; use --inline-functions to inline functions before conversion"
            )


def _close_graph(graph: onnx.GraphProto, main: onnx.GraphProto) -> onnx.GraphProto:
    """A copy of *graph* whose names from the main graph are declared as inputs.

    Training graphs may use the main graph's inputs, initializers and values;
    the converter rejects names it cannot see defined.
    """
    out = onnx.GraphProto()
    out.CopyFrom(graph)
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        defined.update(node.output)
    known = {v.name: v for v in (*main.input, *main.value_info, *main.output)}
    for t in main.initializer:
        known.setdefault(t.name, helper.make_tensor_value_info(t.name, t.data_type, t.dims))
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                defined.add(name)
                if name in known:
                    out.input.append(known[name])
                else:
                    out.input.add().name = name
    return out


def _convert_training(
    info: onnx.TrainingInfoProto, target: int, model: onnx.ModelProto
) -> onnx.TrainingInfoProto:
    out = onnx.TrainingInfoProto()
    out.CopyFrom(info)
    for name in ("initialization", "algorithm"):
        graph = getattr(info, name)
        if not graph.node:
            continue
        what = f"training_info {name} graph {graph.name!r}"
        closed = _close_graph(graph, model.graph)
        converted = _run_converter(_graph_model(closed, model.opset_import, model), target, what)
        del converted.graph.input[len(graph.input):]
        _restore_graph(graph, converted.graph)
        getattr(out, name).CopyFrom(converted.graph)
    return out


def convert_model(
    model: onnx.ModelProto, target: int, *, inline_functions: bool = False
) -> Converted:
    """Convert *model* (a skeleton) to ai.onnx *target*, keeping what onnx drops.

    Raises ConversionError carrying onnx's reason (and the function or graph
    it failed on) when the converter refuses.
    """
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if inline_functions and work.functions:
        try:
            work = onnx.inliner.inline_local_functions(work)
        except Exception as e:
            raise ConversionError(f"inlining functions failed: {_reason(e)}") from e
        notes.append(f"inlined {len(model.functions)} model-local function(s)")
    functions = list(work.functions)
    training = list(work.training_info)
    del work.functions[:]
    del work.training_info[:]
    _add_placeholders(work.graph)
    converted = _run_converter(work, target, "the main graph")
    _restore_graph(model.graph, converted.graph)
    converted.functions.extend(_convert_function(fn, target, model) for fn in functions)
    converted.training_info.extend(_convert_training(t, target, model) for t in training)
    _carry_unknown(model, converted)
    needed = min_ir_version(target)
    if converted.ir_version < needed:
        converted.ir_version = needed
    return Converted(converted, notes)
