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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import onnx
import onnx.inliner
from google.protobuf.message import Message
from onnx import defs, helper, version_converter

from .errors import ConversionError, UsageError

__all__ = [
    "DEFAULT_DOMAINS",
    "Converted",
    "convert_model",
    "default_opset",
    "max_opset",
    "reach",
    "validate_target",
]

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 1
PLACEHOLDER = "__streamconv_sparse__"
HELD_DOMAIN = "streamconv.held"


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


def _relabel_only(model: onnx.ModelProto, source: int, target: int) -> bool:
    """Whether no ai.onnx node of *model* (subgraphs included) changes from opset
    *source* up to *target*: each op's schema at *target* is already the one in
    force at *source* (a new version of an op is the only way its meaning changes).

    Upgrading such a model is changing its opset import; onnx's converter would
    walk it, find nothing to adapt, and write it out again (about 5 ms a call,
    whatever the model: it copies every operator schema first).
    """
    ops: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain in DEFAULT_DOMAINS:
                ops.add(node.op_type)
            graphs.extend(g for _, _, g in _subgraphs(node))
    for op in ops:
        try:
            schema = defs.get_schema(op, target, "")
        except (defs.SchemaError, TypeError, ValueError):
            # an op onnx does not know (or a name that is not text): its converter
            # names the problem
            return False
        if schema.since_version > source or schema.deprecated:
            return False
    return True


def _run_converter(
    model: onnx.ModelProto, target: int, what: str, strict: bool = False
) -> onnx.ModelProto:
    """*model* converted to *target*: downgrades step by step past onnx's adapters.

    With *strict*, or for upgrades, onnx's converter alone does the work, unless
    (without *strict*) an upgrade changes no node: then only the opset import does.
    """
    source = _default_version(model.opset_import)
    if not strict and source is not None and source < target \
            and _relabel_only(model, source, target):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for entry in out.opset_import:
            if entry.domain in DEFAULT_DOMAINS:
                entry.version = target
        return out
    if not strict and source is not None and target < source:
        from . import steps

        try:
            return steps.convert_down(model, target)
        except steps.StepError as e:
            raise ConversionError(
                f"cannot convert {what} to opset {target}: {e.obstacle.describe()}; "
                f"it can be converted to opsets {e.obstacle.step}..{max_opset()}"
            ) from e
        except steps.OnnxStepError as e:
            raise ConversionError(f"onnx's version converter failed on {what}: {e}") from e
    try:
        return version_converter.convert_version(model, target)
    except Exception as e:  # onnx raises ConvertError, RuntimeError, ValueError…
        raise ConversionError(f"onnx's version converter failed on {what}: {_reason(e)}") from e


def _unknown_fields(message: Message) -> bytes:
    """Wire bytes of the fields of *message* that its schema does not know."""
    probe = type(message)()
    probe.CopyFrom(message)
    for descriptor in probe.DESCRIPTOR.fields:
        probe.ClearField(descriptor.name)
    return bytes(probe.SerializeToString())


def _has_unknown(message: Message) -> bool:
    """Whether *message* or any message inside it carries fields its schema does not know."""
    probe = type(message)()
    probe.CopyFrom(message)
    probe.DiscardUnknownFields()
    return bool(probe.ByteSize() != message.ByteSize())


def _identity(message: Message, index: int) -> tuple[object, ...]:
    """What a repeated message is matched by between the input and the converter's output.

    Nodes by their outputs, named things by name, opset imports by domain,
    metadata entries by key; anything else by position.
    """
    if isinstance(message, onnx.NodeProto) and message.output:
        return ("outputs", tuple(message.output))
    if isinstance(message, onnx.FunctionProto):
        return ("function", message.domain, message.name, str(getattr(message, "overload", "")))
    if isinstance(message, onnx.OperatorSetIdProto):
        return ("domain", message.domain)
    if isinstance(message, onnx.StringStringEntryProto):
        return ("key", message.key)
    if isinstance(message, onnx.SparseTensorProto) and message.values.name:
        return ("name", message.values.name)
    if "name" in message.DESCRIPTOR.fields_by_name:
        name = str(getattr(message, "name"))  # noqa: B009 - a proto field, not an attribute
        if name:
            return ("name", name)
    return ("index", index)


def _carry_unknown(source: Message, target: Message) -> None:
    """Copy the unknown fields of *source*, and of every message inside it, onto *target*.

    Sub-messages are matched by :func:`_identity`; positions count only where
    both sides hold as many.  A message the converter removed or replaced
    (an attribute turned into an input, a node rewritten into others) has no
    counterpart, and its unknown fields are lost.  A target that already has
    unknown fields of its own (a copy of the source) is left as it is.
    """
    if not _has_unknown(source):
        return
    data = _unknown_fields(source)
    if data and not _unknown_fields(target):
        target.MergeFromString(data)
    for descriptor in source.DESCRIPTOR.fields:
        if descriptor.message_type is None:
            continue
        name = descriptor.name
        # protobuf 7 drops FieldDescriptor.label for is_repeated; 4.21 has only label
        repeated = getattr(descriptor, "is_repeated", None)
        if repeated is None:
            repeated = descriptor.label == descriptor.LABEL_REPEATED
        if not repeated:
            if source.HasField(name) and target.HasField(name):
                _carry_unknown(getattr(source, name), getattr(target, name))
            continue
        sources, targets = getattr(source, name), getattr(target, name)
        if not sources or not targets:
            continue
        by_identity: dict[tuple[object, ...], Message] = {}
        for i, message in enumerate(targets):
            by_identity.setdefault(_identity(message, i), message)
        positional = len(sources) == len(targets)
        for i, message in enumerate(sources):
            identity = _identity(message, i)
            match = by_identity.get(identity)
            if match is not None and (identity[0] != "index" or positional):
                _carry_unknown(message, match)


_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_SPARSE_TYPES = (onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS)
_SPECIAL_TYPES = _GRAPH_TYPES + _SPARSE_TYPES


def _subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, int, onnx.GraphProto]]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH or attr.HasField("g"):
            yield attr.name, -1, attr.g
        for i, g in enumerate(attr.graphs):
            yield attr.name, i, g


def _has_unknown_fields(model: onnx.ModelProto) -> bool:
    """Whether any message in *model* carries fields its schema does not know."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.DiscardUnknownFields()
    return bool(probe.ByteSize() != model.ByteSize())


def _has_sparse(graph: onnx.GraphProto) -> bool:
    if graph.sparse_initializer:
        return True
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in _SPARSE_TYPES:
                return True
            if attr.type == onnx.AttributeProto.GRAPH and _has_sparse(attr.g):
                return True
            if attr.type == onnx.AttributeProto.GRAPHS and any(_has_sparse(g) for g in attr.graphs):
                return True
    return False


def _placeholder(dims: Iterable[int], data_type: int, name: str = "") -> onnx.TensorProto:
    dense = onnx.TensorProto()
    dense.name = name
    dense.dims.extend(dims)
    dense.data_type = data_type
    entry = dense.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER
    dense.data_location = onnx.TensorProto.EXTERNAL
    return dense


def _add_placeholders(graph: onnx.GraphProto) -> None:
    """Show sparse initializers to the converter as dense (data-less) initializers."""
    for sparse in graph.sparse_initializer:
        graph.initializer.append(
            _placeholder(sparse.dims, sparse.values.data_type, sparse.values.name)
        )
    del graph.sparse_initializer[:]
    for node in graph.node:
        types = [a.type for a in node.attribute]
        if node.op_type == "Constant" and onnx.AttributeProto.SPARSE_TENSOR in types:
            sparse = node.attribute[types.index(onnx.AttributeProto.SPARSE_TENSOR)].sparse_tensor
            dense = _placeholder(sparse.dims, sparse.values.data_type)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", dense))
        elif any(t in _GRAPH_TYPES for t in types):
            for _, _, g in _subgraphs(node):
                _add_placeholders(g)


def _restore_graph(orig: onnx.GraphProto, conv: onnx.GraphProto, unknown: bool) -> None:
    """Copy back what the converter dropped from a graph, matching by identity.

    With *unknown*, the model has unknown fields somewhere and every message
    is checked for them.
    """
    if any(e.value == PLACEHOLDER for t in conv.initializer for e in t.external_data):
        kept = [
            t for t in conv.initializer if not any(e.value == PLACEHOLDER for e in t.external_data)
        ]
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
    if unknown:
        _carry_unknown(orig, conv)
    by_name = {t.name: t for t in orig.initializer if unknown or t.doc_string or t.metadata_props}
    if by_name:
        for t in conv.initializer:
            source = by_name.get(t.name)
            if source is None:
                continue
            if source.doc_string and not t.doc_string:
                t.doc_string = source.doc_string
            if source.metadata_props and not t.metadata_props:
                t.metadata_props.extend(source.metadata_props)
            if unknown:
                _carry_unknown(source, t)
    _restore_nodes(orig.node, conv.node, unknown)


def _restore_nodes(orig_nodes: Iterable[onnx.NodeProto], conv_nodes: Iterable[onnx.NodeProto],
                   unknown: bool = False) -> None:
    """Copy back node metadata, sparse attributes and subgraph contents by node outputs."""
    special = {
        n.output[0]: n for n in orig_nodes
        if n.output and (
            unknown or n.metadata_props or any(a.type in _SPECIAL_TYPES for a in n.attribute)
        )
    }
    if not special:
        return
    conv_nodes = list(conv_nodes)
    # an adapter may split a node: its name stays on one part, never on two
    names = {n.name for n in conv_nodes if n.name}
    for node in conv_nodes:
        source = special.get(node.output[0]) if node.output else None
        if source is None or list(source.output) != list(node.output):
            continue
        if source.metadata_props and not node.metadata_props:
            node.metadata_props.extend(source.metadata_props)
        if source.doc_string and not node.doc_string:
            node.doc_string = source.doc_string
        if source.name and not node.name and source.name not in names:
            node.name = source.name
            names.add(node.name)
        if any(a.type in _SPARSE_TYPES for a in source.attribute):
            del node.attribute[:]
            node.attribute.extend(source.attribute)
        if unknown:
            _carry_unknown(source, node)
        originals = {(name, i): g for name, i, g in _subgraphs(source)}
        for name, i, g in _subgraphs(node):
            if (name, i) in originals:
                _restore_graph(originals[(name, i)], g, unknown)


def _graph_model(
    graph: onnx.GraphProto, imports: object, like: onnx.ModelProto
) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.ir_version = like.ir_version
    model.opset_import.extend(imports)
    model.graph.CopyFrom(graph)
    return model


def _convert_function(
    fn: onnx.FunctionProto, target: int, model: onnx.ModelProto, strict: bool = False,
    input_types: list[onnx.TypeProto | None] | None = None,
) -> onnx.FunctionProto:
    """Convert a function body to *target*; raise ConversionError naming the function.

    *input_types* (from the call sites) let the step-by-step conversion check
    the element types the body really uses.
    """
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
    for i, name in enumerate(fn.input):
        value = body.input.add()
        value.name = name
        if input_types and i < len(input_types) and input_types[i] is not None:
            value.type.CopyFrom(input_types[i])
    for name in fn.output:
        body.output.add().name = name
    if source != target:
        held = _hold_references(body, fn, source, target, what)
        imports = [*fn.opset_import, helper.make_opsetid(HELD_DOMAIN, 1)]
        converted = _run_converter(_graph_model(body, imports, model), target, what, strict)
        for node in converted.graph.node:
            if node.domain == HELD_DOMAIN:
                node.CopyFrom(held[tuple(node.output)])
        _check_references(fn, converted.graph, what)
        del out.node[:]
        out.node.extend(converted.graph.node)
        _restore_nodes(fn.node, out.node)
    for imp in out.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = target
    return out


_DUMMY_VALUES: dict[int, object] = {
    onnx.AttributeProto.FLOAT: 0.0,
    onnx.AttributeProto.INT: 0,
    onnx.AttributeProto.STRING: "",
    onnx.AttributeProto.FLOATS: [0.0],
    onnx.AttributeProto.INTS: [0],
    onnx.AttributeProto.STRINGS: [""],
}


def _dummy_attribute(attr: onnx.AttributeProto) -> onnx.AttributeProto | None:
    if attr.type == onnx.AttributeProto.TENSOR:
        return helper.make_attribute(attr.name, helper.make_tensor("", onnx.TensorProto.FLOAT,
                                                                   [], [0.0]))
    if attr.type in _DUMMY_VALUES:
        return helper.make_attribute(attr.name, _DUMMY_VALUES[attr.type])
    return None


def _converts_unchanged(node: onnx.NodeProto, source: int, target: int) -> bool:
    """Whether onnx's converter leaves *node*'s inputs and attributes as they are.

    The node's attribute references are replaced by dummy values of their type,
    and a one-node model is converted to see what the adapters do.
    """
    probe = onnx.NodeProto()
    probe.CopyFrom(node)
    del probe.attribute[:]
    for attr in node.attribute:
        if attr.ref_attr_name:
            dummy = _dummy_attribute(attr)
            if dummy is None:
                return False
            probe.attribute.append(dummy)
        else:
            probe.attribute.append(attr)
    graph = helper.make_graph(
        [probe], "probe", [helper.make_value_info(n, onnx.TypeProto()) for n in node.input if n],
        [helper.make_value_info(n, onnx.TypeProto()) for n in node.output if n],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", source)])
    try:
        converted = version_converter.convert_version(model, target)
    except Exception:
        return False
    same = [n for n in converted.graph.node if list(n.output) == list(node.output)]
    return (
        len(converted.graph.node) == 1
        and len(same) == 1
        and same[0].op_type == node.op_type
        and list(same[0].input) == list(node.input)
        and sorted(a.name for a in same[0].attribute) == sorted(a.name for a in probe.attribute)
    )


def _hold_references(
    body: onnx.GraphProto, fn: onnx.FunctionProto, source: int, target: int, what: str
) -> dict[tuple[str, ...], onnx.NodeProto]:
    """Set aside body nodes that use attribute references (the converter cannot see them).

    A node is held out of conversion only when converting it would not change
    it; otherwise the function cannot be converted faithfully: ConversionError.
    """
    held: dict[tuple[str, ...], onnx.NodeProto] = {}
    for node in body.node:
        refs = [a.name for a in node.attribute if a.ref_attr_name]
        if not refs or node.domain not in DEFAULT_DOMAINS:
            continue
        if not _converts_unchanged(node, source, target):
            raise ConversionError(
                f"cannot convert {what}: node {node.op_type} ({node.name or node.output[0]}) "
                f"takes attribute {refs[0]!r} from the caller and changes between opset "
                f"{source} and {target}; use --inline-functions to inline functions first"
            )
        original = onnx.NodeProto()
        original.CopyFrom(node)
        held[tuple(node.output)] = original
        node.domain = HELD_DOMAIN
        del node.attribute[:]
    return held


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


def _call_site_types(
    model: onnx.ModelProto, functions: list[onnx.FunctionProto]
) -> dict[tuple[str, str], list[onnx.TypeProto | None]]:
    """Input types of each model-local function, where all its call sites agree."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as e:  # inference is help here, not a requirement
        log.debug("shape inference for function call sites failed: %s", e)
        return {}
    wanted = {(f.domain, f.name) for f in functions}
    types: dict[str, onnx.TypeProto] = {}
    calls: list[onnx.NodeProto] = []

    def visit(graph: onnx.GraphProto) -> None:
        for v in (*graph.input, *graph.value_info, *graph.output):
            if v.type.WhichOneof("value"):
                types.setdefault(v.name, v.type)
        for t in graph.initializer:
            types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, t.dims))
        for node in graph.node:
            if (node.domain, node.op_type) in wanted:
                calls.append(node)
            for _, _, g in _subgraphs(node):
                visit(g)

    visit(inferred.graph)
    out: dict[tuple[str, str], list[onnx.TypeProto | None]] = {}
    for node in calls:
        found = [types.get(name) if name else None for name in node.input]
        key = (node.domain, node.op_type)
        if key not in out:
            out[key] = found
            continue
        out[key] = [a if a is not None and b is not None and a == b else None
                    for a, b in zip(out[key], found, strict=False)]
    return out


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
    info: onnx.TrainingInfoProto, target: int, model: onnx.ModelProto, strict: bool = False
) -> onnx.TrainingInfoProto:
    out = onnx.TrainingInfoProto()
    out.CopyFrom(info)
    for name in ("initialization", "algorithm"):
        graph = getattr(info, name)
        if not graph.node:
            continue
        what = f"training_info {name} graph {graph.name!r}"
        closed = _close_graph(graph, model.graph)
        converted = _run_converter(
            _graph_model(closed, model.opset_import, model), target, what, strict
        )
        del converted.graph.input[len(graph.input):]
        _restore_graph(graph, converted.graph, unknown=False)
        getattr(out, name).CopyFrom(converted.graph)
    return out


def reach(model: onnx.ModelProto, *, strict_onnx: bool = False
          ) -> tuple[int, str | None, int, str | None]:
    """``(lowest, why not lower, highest, why not higher)`` for a skeleton.

    Functions and training graphs are converted with the main graph, as in
    :func:`convert_model`; the walk down stops at the first step any of them
    cannot cross.
    """
    source = default_opset(model)
    newest = max_opset()

    def converts(target: int) -> str | None:
        try:
            convert_model(model, target, strict_onnx=strict_onnx)
        except ConversionError as e:
            return e.message
        return None

    low, below = source, None
    if not strict_onnx:
        from . import steps

        try:
            low, obstacle = steps.lowest_opset(_with_bodies(model))
            below = None if obstacle is None else obstacle.describe()
        except steps.OnnxStepError as e:
            low, below = source, str(e)
    # function bodies and training graphs convert on their own: confirm the bound
    while low < source and (why := converts(low)) is not None:
        low, below = low + 1, why
    if strict_onnx:
        while low > 1 and (why := converts(low - 1)) is None:
            low -= 1
        if low > 1:
            below = converts(low - 1)
    high, above = newest, converts(newest) if newest > source else None
    if above is not None:
        high = source
        while high < newest and (why := converts(high + 1)) is None:
            high += 1
        above = None if high == newest else converts(high + 1)
    return low, below, high, above


def _with_bodies(model: onnx.ModelProto) -> onnx.ModelProto:
    """The main graph alone (functions and training graphs are confirmed separately)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.functions[:]
    del out.training_info[:]
    if _has_sparse(out.graph):
        _add_placeholders(out.graph)
    return out


def _fill_attribute_defaults(model: onnx.ModelProto) -> None:
    """Give every call of a model-local function the attribute defaults it does not set.

    onnx's inliner substitutes only the attributes a call site sets: a
    reference to an attribute left at the default of the function's
    ``attribute_proto`` is dropped, leaving e.g. a Constant without a value.
    Spelling the defaults out at each call site keeps what the function means.
    """
    defaults = {(f.domain, f.name): list(f.attribute_proto)
                for f in model.functions if len(f.attribute_proto)}
    if not defaults:
        return

    def visit(nodes: Iterable[onnx.NodeProto]) -> None:
        for node in nodes:
            given = {a.name for a in node.attribute}
            for default in defaults.get((node.domain, node.op_type), ()):
                if default.name not in given:
                    node.attribute.append(default)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    visit(attribute.g.node)
                for graph in attribute.graphs:
                    visit(graph.node)

    visit(model.graph.node)
    for function in model.functions:
        visit(function.node)


def convert_model(
    model: onnx.ModelProto, target: int, *, inline_functions: bool = False,
    strict_onnx: bool = False,
) -> Converted:
    """Convert *model* (a skeleton) to ai.onnx *target*, keeping what onnx drops.

    Downgrades go step by step through :mod:`streamconv.steps` (onnx's
    adapters where they are right, streamconv's own elsewhere); with
    *strict_onnx* only onnx's converter is used.

    Raises ConversionError carrying onnx's reason (and the function or graph
    it failed on) when the converter refuses.
    """
    notes: list[str] = []
    work = model
    sparse = _has_sparse(model.graph)
    if sparse or model.functions or model.training_info:
        # the converter must not see these; work on a copy
        work = onnx.ModelProto()
        work.CopyFrom(model)
    if inline_functions and work.functions:
        _fill_attribute_defaults(work)
        try:
            work = onnx.inliner.inline_local_functions(work)
        except Exception as e:
            raise ConversionError(f"inlining functions failed: {_reason(e)}") from e
        notes.append(f"inlined {len(model.functions)} model-local function(s)")
    functions = list(work.functions)
    training = list(work.training_info)
    if work is not model:
        del work.functions[:]
        del work.training_info[:]
    if sparse:
        _add_placeholders(work.graph)
    converted = _run_converter(work, target, "the main graph", strict_onnx)
    unknown = _has_unknown_fields(model)
    _restore_graph(model.graph, converted.graph, unknown)
    sites = _call_site_types(model, functions) if functions and not strict_onnx else {}
    converted.functions.extend(
        _convert_function(fn, target, model, strict_onnx, sites.get((fn.domain, fn.name)))
        for fn in functions
    )
    converted.training_info.extend(
        _convert_training(t, target, model, strict_onnx) for t in training
    )
    if unknown:
        _carry_unknown(model, converted)
    needed = min_ir_version(target)
    if converted.ir_version < needed:
        converted.ir_version = needed
    return Converted(converted, notes)
