"""Whether a node fits the older schema of its op: attributes, inputs and element types.

A COMPATIBLE step (only types, defaulted attributes or documentation changed)
lets a node cross unchanged exactly when everything it uses exists in the
older schema.  Types come from shape inference on the skeleton; a formal
parameter whose allowed types did not change needs no type at all.
"""

from __future__ import annotations

from functools import cache

import onnx
from onnx import defs, helper

from ._context import Refusal, StepContext

__all__ = ["fit_older_schema", "fit_or_refuse", "schema_at", "type_string"]


@cache
def schema_at(op: str, opset: int) -> defs.OpSchema | None:
    """The ai.onnx schema of *op* in force at *opset*, or None if it has none."""
    try:
        return defs.get_schema(op, opset, "")
    except defs.SchemaError:
        return None


def type_string(t: onnx.TypeProto | None) -> str | None:
    """*t* written the way onnx.defs writes allowed types, e.g. ``tensor(float)``."""
    if t is None:
        return None
    which = t.WhichOneof("value")
    if which == "tensor_type":
        if not t.tensor_type.elem_type:
            return None
        return f"tensor({_elem_name(t.tensor_type.elem_type)})"
    if which == "sparse_tensor_type":
        if not t.sparse_tensor_type.elem_type:
            return None
        return f"sparse_tensor({_elem_name(t.sparse_tensor_type.elem_type)})"
    if which == "sequence_type":
        inner = type_string(t.sequence_type.elem_type)
        return None if inner is None else f"seq({inner})"
    if which == "optional_type":
        inner = type_string(t.optional_type.elem_type)
        return None if inner is None else f"optional({inner})"
    if which == "map_type":
        inner = type_string(t.map_type.value_type)
        key = _elem_name(t.map_type.key_type)
        return None if inner is None else f"map({key},{inner})"
    return None


@cache
def _elem_name(elem_type: int) -> str:
    try:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:  # a number no onnx type has: in no schema's allowed list
        return f"undefined type {elem_type}"
    return {"float": "float", "string": "string"}.get(name, name)


_ALLOWED: dict[tuple[str, int], dict[str, frozenset[str]]] = {}


def _allowed(schema: defs.OpSchema) -> dict[str, frozenset[str]]:
    key = (schema.name, schema.since_version)
    found = _ALLOWED.get(key)
    if found is None:
        found = {c.type_param_str: frozenset(c.allowed_type_strs)
                 for c in schema.type_constraints}
        _ALLOWED[key] = found
    return found


def _formal(params: list[defs.OpSchema.FormalParameter], index: int
            ) -> defs.OpSchema.FormalParameter | None:
    if index < len(params):
        return params[index]
    if params and params[-1].option == defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _is_default(attr: onnx.AttributeProto, schema: defs.OpSchema) -> bool:
    spec = schema.attributes.get(attr.name)
    if spec is None or not spec.default_value.name:
        return False
    return bool(helper.get_attribute_value(attr) == helper.get_attribute_value(spec.default_value))


def _values(kind: str, names: list[str], params: list[defs.OpSchema.FormalParameter],
            new_params: list[defs.OpSchema.FormalParameter], allowed: dict[str, frozenset[str]],
            new_allowed: dict[str, frozenset[str]], older: int, ctx: StepContext,
            problems: list[str]) -> None:
    last = max((i for i, n in enumerate(names) if n), default=-1)
    for i in range(last + 1):
        name = names[i]
        formal = _formal(params, i)
        if formal is None:
            problems.append(f"{kind} {i} ({name!r}) does not exist below opset {older + 1}")
            continue
        if not name:
            if formal.option == defs.OpSchema.FormalParameterOption.Single:
                problems.append(f"{kind} {formal.name!r} is required below opset {older + 1}")
            continue
        old_types = allowed.get(formal.type_str, frozenset({formal.type_str}))
        new_formal = _formal(new_params, i)
        if new_formal is not None:
            new_types = new_allowed.get(new_formal.type_str, frozenset({new_formal.type_str}))
            if new_types <= old_types:
                continue  # nothing this parameter may hold was added
        actual = type_string(ctx.type_of(name))
        if actual is None:
            problems.append(
                f"the type of {kind} {name!r} is unknown, and opset {older} allows only "
                f"{', '.join(sorted(old_types))}"
            )
        elif actual not in old_types:
            problems.append(f"{kind} {name!r} is {actual}, which opset {older} does not allow")
    if kind == "input":
        required = sum(
            1 for p in params if p.option == defs.OpSchema.FormalParameterOption.Single
        )
        if last + 1 < required:
            problems.append(f"opset {older} needs {required} inputs, the node has {last + 1}")


def fit_older_schema(node: onnx.NodeProto, older: int, ctx: StepContext
                     ) -> tuple[onnx.NodeProto, list[str]]:
    """*node* as the older schema at opset *older* takes it, and what is in the way.

    Attributes the older schema lacks are dropped when they hold the newer
    schema's default; anything else the older schema cannot express is listed
    in the returned problems (empty when the node fits).
    """
    old = schema_at(node.op_type, older)
    new = schema_at(node.op_type, older + 1)
    problems: list[str] = []
    if old is None or new is None:
        return node, [f"{node.op_type} does not exist at opset {older}"]
    out = node  # the same node when it fits as it is: nothing to copy
    kept = []
    for attr in node.attribute:
        if attr.name in old.attributes:
            kept.append(attr)
        elif not _is_default(attr, new):
            value = helper.get_attribute_value(attr)
            shown = value.decode(errors="replace") if isinstance(value, bytes) else value
            problems.append(f"attribute {attr.name}={shown!r} has no equivalent below opset "
                            f"{older + 1}")
    if len(kept) != len(node.attribute):
        out = onnx.NodeProto()
        out.CopyFrom(node)
        del out.attribute[:]
        out.attribute.extend(kept)
    allowed, new_allowed = _allowed(old), _allowed(new)
    _values("input", list(node.input), list(old.inputs), list(new.inputs), allowed, new_allowed,
            older, ctx, problems)
    _values("output", list(node.output), list(old.outputs), list(new.outputs), allowed,
            new_allowed, older, ctx, problems)
    _bindings(node, old, new, older, ctx, problems)
    return out, problems


@cache
def _splits_at(op: str, old_version: int, new_version: int) -> bool:
    old, new = schema_at(op, old_version), schema_at(op, new_version)
    assert old is not None and new is not None
    seen: dict[str, set[str]] = {}
    for params, new_params in ((old.inputs, new.inputs), (old.outputs, new.outputs)):
        for formal, new_formal in zip(params, new_params, strict=False):
            seen.setdefault(formal.type_str, set()).add(new_formal.type_str)
    return any(len(v) > 1 for v in seen.values())


def _splits(old: defs.OpSchema, new: defs.OpSchema) -> bool:
    """Whether a type parameter of *old* binds values that *new* types separately."""
    return _splits_at(old.name, old.since_version, new.since_version)


def _bindings(node: onnx.NodeProto, old: defs.OpSchema, new: defs.OpSchema, older: int,
              ctx: StepContext, problems: list[str]) -> None:
    """Values one type parameter of the older schema binds must have one type.

    The newer schema may have split a parameter (BatchNormalization 15: scale and
    mean may differ from X); then the values must be seen to agree.
    """
    if not _splits(old, new):
        return
    constrained = set(_allowed(old))
    groups: dict[str, list[tuple[str, str]]] = {}
    for _kind, names, params, new_params in (
            ("input", node.input, old.inputs, new.inputs),
            ("output", node.output, old.outputs, new.outputs)):
        for i, name in enumerate(names):
            formal, new_formal = _formal(list(params), i), _formal(list(new_params), i)
            if not name or formal is None or formal.type_str not in constrained:
                continue
            groups.setdefault(formal.type_str, []).append(
                (name, new_formal.type_str if new_formal is not None else ""))
    for members in groups.values():
        if len({new_param for _, new_param in members}) < 2:
            continue  # bound together in the newer schema too
        types = {name: type_string(ctx.type_of(name)) for name, _ in members}
        if None in types.values() or len(set(types.values())) > 1:
            shown = ", ".join(f"{n!r} {t or 'of unknown type'}" for n, t in types.items())
            problems.append(f"opset {older} needs one type for {shown}")


def fit_or_refuse(node: onnx.NodeProto, ctx: StepContext) -> onnx.NodeProto:
    """*node* as the schema at ``ctx.opset`` takes it (an adapter's last check).

    Raises Refusal listing what the older schema cannot express.
    """
    fitted, problems = fit_older_schema(node, ctx.opset, ctx)
    if problems:
        raise Refusal("; ".join(problems))
    return fitted
