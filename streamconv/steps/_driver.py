"""Walk a model down one opset at a time, past what onnx's converter can do.

At each step ``v -> v-1`` only the nodes whose op changed at ``v`` are
affected.  For each, the step table (:mod:`._table`) says how it crosses:
onnx's adapter, unchanged after a schema check, a streamconv adapter, the
op's function body, or a refusal.  Nodes streamconv handled are *held* (moved
to a private domain) while onnx's converter does the rest of the step, then
put back.  Steps where only onnx works are run as one call to onnx, retried
one step at a time if onnx trips on a node an adapter of its own produced.
The walk covers the main graph and subgraphs at any depth; function bodies
and training graphs come here through :func:`convert_down` too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
from onnx import helper, shape_inference, version_converter

from . import adapters as _adapters  # noqa: F401  (registers the adapters)
from ._context import ADAPTERS, Refusal, StepContext
from ._expand import expand_function
from ._schema import fit_older_schema, schema_at
from ._table import Kind, find_step

__all__ = ["Obstacle", "StepError", "convert_down", "lowest_opset"]

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
HELD = "streamconv.step.held"
#: expansions inside expansions deeper than this are taken for a loop
MAX_EXPANSIONS = 8


@dataclass
class Obstacle:
    """The first node that cannot cross a step, and why."""

    step: int  # the node cannot go below this opset
    op: str
    node: str
    path: str
    reason: str
    #: the op the blocked node was made of, when an earlier step rewrote the model's node
    via: str = ""

    def describe(self) -> str:
        made = f"; rewritten, it needs {self.via}" if self.via else ""
        return (f"node {self.node!r} ({self.op}, {self.path}{made}) has no equivalent below "
                f"opset {self.step}: {self.reason}")


class StepError(Exception):
    """A node cannot cross an opset step; carries the :class:`Obstacle`."""

    def __init__(self, obstacle: Obstacle) -> None:
        super().__init__(obstacle.describe())
        self.obstacle = obstacle


class OnnxStepError(Exception):
    """onnx's converter failed on a step streamconv left to it."""


#: the ai.onnx ops with graph attributes (nodes of other domains may have them too)
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def _graphs(graph: onnx.GraphProto, path: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    yield graph, path
    for i, node in enumerate(graph.node):
        # reading every node's attributes is most of a walk's cost on large graphs
        if node.op_type not in _CONTROL_FLOW and node.domain in DEFAULT_DOMAINS:
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, f"{path}.node[{i}].{attr.name}")
            for j, g in enumerate(attr.graphs):
                yield from _graphs(g, f"{path}.node[{i}].{attr.name}[{j}]")


_Key = tuple[str, tuple[str, ...], tuple[str, ...]]


def _key(node: onnx.NodeProto) -> _Key:
    """How a held node is found again: op type, inputs and outputs.

    Outputs alone are not enough: a branch may name its output like the If
    node that holds it.
    """
    return (node.op_type, tuple(node.input), tuple(node.output))


def _is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


@dataclass
class _Scope:
    """What the contexts of one conversion share: types, constants, names."""

    model: onnx.ModelProto
    types: dict[str, onnx.TypeProto] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    serial: list[int] = field(default_factory=lambda: [0])
    typed_at: int = -1
    #: node name -> (name, op type, path) of the model's node it was made for
    origins: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    #: every type inferred so far: a step keeps what each value is, so a type seen
    #: at a newer opset still holds where inference on a rewrite cannot tell
    #: (e.g. Shape's start/end became a Slice whose length depends on values)
    known: dict[str, onnx.TypeProto] = field(default_factory=dict)
    used: set[tuple[str, int]] = field(default_factory=set)
    #: the last step rewrote nodes (types inferred before it may no longer hold)
    rewrote: bool = False

    def after(self, model: onnx.ModelProto) -> _Scope:
        """A scope for *model*, the next state of this one's model."""
        return _Scope(model, serial=self.serial, origins=self.origins, known=self.known,
                      used=self.used)

    def refresh(self, opset: int) -> None:
        """Infer types for the model as it stands (at *opset*), once per opset."""
        if self.typed_at == opset:
            return
        self.typed_at = opset
        self.types.clear()
        self.constants.clear()
        # no data propagation: onnx's propagates element values of large tensors
        # too (seen: 4.9 GB of memory for a 256 MB model)
        try:
            inferred = shape_inference.infer_shapes(self._annotated(), check_type=False,
                                                    strict_mode=False, data_prop=False)
        except Exception as e:  # inference is help, not a requirement
            log.debug("shape inference failed: %s", e)
            inferred = self.model
        for graph, _ in _graphs(inferred.graph, "graph"):
            for v in (*graph.input, *graph.value_info, *graph.output):
                if v.type.WhichOneof("value"):
                    self.types.setdefault(v.name, v.type)
            for t in graph.initializer:
                self.types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, t.dims))
                if not _is_stub(t):
                    self.constants[t.name] = t
            for node in graph.node:
                self.names.update(node.output)
                self.names.add(node.name)
                if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                    for a in node.attribute:
                        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR \
                                and not _is_stub(a.t):
                            self.constants[node.output[0]] = a.t
        for graph, _ in _graphs(self.model.graph, "graph"):
            self.names.update(v.name for v in graph.input)
            self.names.update(t.name for t in graph.initializer)
        for graph, _ in list(_graphs(self.model.graph, "graph"))[1:]:
            if any(o and o not in self.types for n in graph.node for o in n.output):
                self._infer_alone(graph, opset)
        for name, t in self.known.items():
            if name not in self.types or not _has_rank(self.types[name]):
                self.types[name] = t
        for name, t in self.types.items():
            if _has_rank(t) or name not in self.known:
                self.known[name] = t

    def _annotated(self) -> onnx.ModelProto:
        """The model with the shapes known from newer opsets written into its value_info
        where it has none, as a starting point for inference (a copy; the model
        itself is left as it is).

        Inference inside a Loop or Scan body starts from the body's value_info;
        what an earlier step inferred there would otherwise be lost to the steps
        after it (onnx's converter writes what it inferred into its output,
        streamconv's own steps do not).
        """
        ranked = {n: t for n, t in self.known.items() if _has_rank(t)}
        if not ranked:
            return self.model
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for graph, _ in _graphs(model.graph, "graph"):
            kept = [v for v in graph.value_info if v.type.WhichOneof("value") and (
                _has_rank(v.type) or v.name not in ranked)]
            typed = {v.name for v in kept} | {v.name for v in graph.output}
            new = [helper.make_value_info(o, ranked[o]) for n in graph.node
                   for o in n.output if o and o in ranked and o not in typed]
            if new or len(kept) != len(graph.value_info):
                del graph.value_info[:]
                graph.value_info.extend(kept + new)
        return model

    def _infer_alone(self, graph: onnx.GraphProto, opset: int) -> None:
        """Types inside a subgraph model inference did not enter (e.g. under an op of
        another domain), inferred with the subgraph standing alone."""
        extra, constants = _outer_values(graph, self)
        alone = onnx.ModelProto()
        alone.ir_version = max(self.model.ir_version, 4)
        alone.opset_import.extend(self.model.opset_import)
        alone.graph.CopyFrom(graph)
        alone.graph.input.extend(extra)
        alone.graph.initializer.extend(constants)
        try:
            inferred = shape_inference.infer_shapes(alone, check_type=False, strict_mode=False,
                                                    data_prop=False)
        except Exception as e:  # inference is help, not a requirement
            log.debug("shape inference of a subgraph failed: %s", e)
            return
        for v in (*inferred.graph.value_info, *inferred.graph.output):
            if v.type.WhichOneof("value"):
                self.types.setdefault(v.name, v.type)

    def context(self, opset: int, where: str) -> StepContext:
        return StepContext(opset=opset, types=self.types, constants=self.constants,
                           names=self.names, where=where, serial=self.serial,
                           steps_used=self.used)


def _has_rank(t: onnx.TypeProto) -> bool:
    return t.WhichOneof("value") != "tensor_type" or t.tensor_type.HasField("shape")


def _set_opset(model: onnx.ModelProto, opset: int) -> None:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            imp.version = opset


def _default_opset(model: onnx.ModelProto) -> int:
    return max(int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS)


def _affected(node: onnx.NodeProto, version: int) -> bool:
    if node.domain not in DEFAULT_DOMAINS:
        return False
    schema = schema_at(node.op_type, version)
    return schema is not None and schema.since_version == version


def _describe(node: onnx.NodeProto, path: str, index: int) -> tuple[str, str]:
    return node.name or (node.output[0] if node.output else node.op_type), f"{path}.node[{index}]"


def _op_types(model: onnx.ModelProto) -> frozenset[str]:
    """The ai.onnx op types in *model*, subgraphs included (one walk)."""
    return frozenset(n.op_type for g, _ in _graphs(model.graph, "graph") for n in g.node
                     if n.domain in DEFAULT_DOMAINS)


def _changed_at(ops: frozenset[str], version: int) -> list[str]:
    out = []
    for op in ops:
        schema = schema_at(op, version)
        if schema is not None and schema.since_version == version:
            out.append(op)
    return out


def _needs_streamconv(model: onnx.ModelProto, version: int,
                      ops: frozenset[str] | None = None) -> bool:
    """Whether any node affected at *version* is one onnx does not handle."""
    for op in _changed_at(_op_types(model) if ops is None else ops, version):
        step = find_step(op, version)
        if step is None or step.kind is not Kind.ONNX:
            return True
    return False


def _onnx_affected(model: onnx.ModelProto, version: int,
                   ops: frozenset[str] | None = None) -> bool:
    return bool(_changed_at(_op_types(model) if ops is None else ops, version))


def _cross(node: onnx.NodeProto, version: int, ctx: StepContext, name: str, path: str,
           depth: int = 0) -> list[tuple[onnx.NodeProto, bool]]:
    """The nodes replacing *node* at step version -> version-1, each with whether it is held.

    Held nodes are valid at version-1 already; the others are left for onnx's
    converter to adapt (or are not affected by the step at all).
    """
    step = find_step(node.op_type, version)
    if step is None:
        # a schema newer than the table: let onnx's converter try it
        return [(node, False)]
    if step.kind is Kind.ONNX:
        return [(node, False)]
    ctx.steps_used.add((node.op_type, version))
    try:
        if step.kind is Kind.COMPATIBLE:
            fitted, problems = fit_older_schema(node, version - 1, ctx)
            if problems:
                raise Refusal("; ".join(problems))
            return [(fitted, True)]
        if step.kind is Kind.ADAPTER:
            fn = ADAPTERS.get((node.op_type, version))
            if fn is None:
                raise Refusal(f"{step.reason} (streamconv has no adapter for this step yet)")
            return [(n, True) for n in fn(node, ctx)]
        if step.kind is Kind.EXPAND:
            if depth >= MAX_EXPANSIONS:
                raise Refusal("function bodies expand into themselves")
            body = expand_function(node, version, ctx)
            _infer_local(body, version, ctx)
            out: list[tuple[onnx.NodeProto, bool]] = []
            for inner in body:
                if _affected(inner, version):
                    try:
                        out.extend(_cross(inner, version, ctx, name, path, depth + 1))
                    except StepError as e:
                        if not e.obstacle.via:
                            e.obstacle.via = f"{e.obstacle.op} (its function body)"
                            e.obstacle.op = node.op_type
                            e.args = (e.obstacle.describe(),)
                        raise
                else:
                    out.append((inner, False))
            return out
        raise Refusal(step.reason)
    except Refusal as e:
        raise StepError(Obstacle(version, node.op_type, name, path, str(e))) from e


def _inherit(new: onnx.NodeProto, old: onnx.NodeProto) -> None:
    """Metadata of a rewritten node goes to the nodes that produce its outputs."""
    if old.metadata_props and not new.metadata_props:
        new.metadata_props.extend(old.metadata_props)
    if old.doc_string and not new.doc_string:
        new.doc_string = old.doc_string


def _infer_local(nodes: list[onnx.NodeProto], opset: int, ctx: StepContext) -> None:
    """Add the types of the values *nodes* produce to *ctx*, by inference on them alone."""
    produced = {o for n in nodes for o in n.output if o}
    used = [i for n in nodes for i in n.input if i and i not in produced]
    inputs = []
    for name in dict.fromkeys(used):
        v = onnx.ValueInfoProto()
        v.name = name
        if name in ctx.types:
            v.type.CopyFrom(ctx.types[name])
        inputs.append(v)
    graph = helper.make_graph(nodes, "expansion", inputs, [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception as e:  # inference is help, not a requirement
        log.debug("shape inference of an expansion failed: %s", e)
        return
    for v in inferred.graph.value_info:
        if v.type.WhichOneof("value"):
            ctx.types.setdefault(v.name, v.type)


def _apply_step(scope: _Scope, version: int) -> set[_Key]:
    """Rewrite every affected node streamconv handles; return the held nodes' outputs."""
    scope.refresh(version)
    scope.rewrote = False
    held: set[_Key] = set()
    # children before parents: a parent's rewrite copies its subgraphs as they stand
    for graph, path in reversed(list(_graphs(scope.model.graph, "graph"))):
        if not any(_affected(n, version) for n in graph.node):
            continue
        new_nodes: list[onnx.NodeProto] = []
        rewritten = False
        for i, node in enumerate(graph.node):
            if not _affected(node, version):
                new_nodes.append(node)
                continue
            name, where = _describe(node, path, i)
            origin = scope.origins.get(node.name)
            try:
                crossed = _cross(node, version, scope.context(version - 1, where), name, where)
            except StepError as e:
                if origin is not None and not e.obstacle.via:
                    via = "" if e.obstacle.op == origin[1] else f"{e.obstacle.op} ({where})"
                    e.obstacle.node, e.obstacle.via, e.obstacle.path = origin[0], via, origin[2]
                    e.obstacle.op = origin[1]
                    e.args = (e.obstacle.describe(),)
                raise
            for new, is_held in crossed:
                if new is not node:
                    rewritten = True
                    if set(new.output) & set(node.output):
                        _inherit(new, node)
                    if new.name and new.name not in scope.origins:
                        scope.origins[new.name] = origin or (name, node.op_type, where)
                new_nodes.append(new)
                if is_held:
                    held.add(_key(new))
        if not rewritten:
            continue  # every node fits as it is: the graph stays as it is
        scope.rewrote = True
        copies = []
        for n in new_nodes:
            c = onnx.NodeProto()
            c.CopyFrom(n)
            copies.append(c)
        del graph.node[:]
        graph.node.extend(copies)
    return held


def _run_onnx(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """onnx's converter, with the node metadata it drops put back (by outputs)."""
    marked = {tuple(n.output): n for g, _ in _graphs(model.graph, "graph") for n in g.node
              if n.metadata_props or n.doc_string}
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:  # ConvertError, RuntimeError, ValueError…
        text = str(e).strip()
        raise OnnxStepError(text.splitlines()[0] if text else type(e).__name__) from e
    if marked:
        for g, _ in _graphs(converted.graph, "graph"):
            for n in g.node:
                source = marked.get(tuple(n.output))
                if source is not None:
                    _inherit(n, source)
    return converted


def _outer_values(graph: onnx.GraphProto, scope: _Scope
                  ) -> tuple[list[onnx.ValueInfoProto], list[onnx.TensorProto]]:
    """Names *graph* uses from enclosing scopes, declared so it can stand alone.

    Constants (which onnx's adapters may need to read, e.g. Squeeze axes) become
    initializers; everything else becomes a graph input.
    """
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    extra: list[onnx.ValueInfoProto] = []
    constants: list[onnx.TensorProto] = []
    for g, _ in _graphs(graph, ""):
        for node in g.node:
            defined.update(node.output)
    for g, _ in _graphs(graph, ""):
        defined.update(i.name for i in g.input)
        defined.update(t.name for t in g.initializer)
    for g, _ in _graphs(graph, ""):
        for node in g.node:
            for name in node.input:
                if name and name not in defined:
                    defined.add(name)
                    if name in scope.constants:
                        t = onnx.TensorProto()
                        t.CopyFrom(scope.constants[name])
                        t.name = name
                        constants.append(t)
                        continue
                    v = onnx.ValueInfoProto()
                    v.name = name
                    if name in scope.types:
                        v.type.CopyFrom(scope.types[name])
                    extra.append(v)
    return extra, constants


def _onnx_step(model: onnx.ModelProto, keys: set[_Key], source: int, target: int,
               scope: _Scope) -> onnx.ModelProto:
    """onnx's converter from *source* to *target*, with held nodes kept out of its way.

    *keys* are the output names of the held nodes.
    """
    if not keys:
        return _run_onnx(model, target)
    originals: dict[_Key, onnx.NodeProto] = {}
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for graph, _ in _graphs(work.graph, "graph"):
        for node in graph.node:
            key = _key(node)
            if key in keys and node.domain != HELD:
                kept = onnx.NodeProto()
                kept.CopyFrom(node)
                # onnx's converter does not enter nodes of other domains: convert
                # the subgraphs of a held node on their own
                for attr in kept.attribute:
                    subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                    for sub in subs:
                        sub.CopyFrom(_convert_subgraph(sub, work, keys, source, target, scope))
                originals[key] = kept
                node.domain = HELD
                del node.attribute[:]
    if not any(o.domain == HELD for o in work.opset_import):
        work.opset_import.append(helper.make_opsetid(HELD, 1))
    converted = _run_onnx(work, target)
    for graph, _ in _graphs(converted.graph, "graph"):
        for node in graph.node:
            if node.domain == HELD:
                node.CopyFrom(originals[_key(node)])
    kept_imports = [o for o in converted.opset_import if o.domain != HELD]
    del converted.opset_import[:]
    converted.opset_import.extend(kept_imports)
    return converted


def _convert_subgraph(sub: onnx.GraphProto, like: onnx.ModelProto, keys: set[_Key],
                      source: int, target: int, scope: _Scope) -> onnx.GraphProto:
    if not any(_onnx_affected_graph(g, source, target) for g, _ in _graphs(sub, "")):
        return sub
    extra, constants = _outer_values(sub, scope)
    standalone = onnx.ModelProto()
    standalone.ir_version = max(like.ir_version, 4)  # initializers need not be inputs
    standalone.opset_import.extend(like.opset_import)
    standalone.graph.CopyFrom(sub)
    standalone.graph.input.extend(extra)
    standalone.graph.initializer.extend(constants)
    converted = _onnx_step(standalone, keys, source, target, scope)
    out = converted.graph
    del out.input[len(sub.input):]
    borrowed = {t.name for t in constants}
    kept = [t for t in out.initializer if t.name not in borrowed]
    del out.initializer[:]
    out.initializer.extend(kept)
    return out


def _onnx_affected_graph(graph: onnx.GraphProto, source: int, target: int) -> bool:
    return any(_affected(n, v) for n in graph.node for v in range(target + 1, source + 1))


def convert_down(model: onnx.ModelProto, target: int, what: str = "the main graph",
                 steps_used: set[tuple[str, int]] | None = None) -> onnx.ModelProto:
    """*model* converted down to ai.onnx *target*, one opset step at a time.

    *steps_used*, when given, collects the (op, version) rows streamconv crossed
    itself (every kind but onnx's).

    Raises StepError with the first obstacle when a node cannot cross a step,
    and OnnxStepError with onnx's reason when onnx's converter fails on a
    step left to it.
    """
    source = _default_opset(model)
    dead = _dead_constants(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    scope = _Scope(work, used=steps_used if steps_used is not None else set())
    version = source
    pending: int | None = None  # opset the model really is at while onnx steps wait
    ops: frozenset[str] | None = None  # the model's op types, while the model stands
    while version > target:
        if ops is None:
            ops = _op_types(scope.model)
        if _needs_streamconv(scope.model, version, ops):
            ops = None  # what follows rewrites the model
            if pending is not None:
                scope = scope.after(_flush(scope.model, pending, version, scope.used))
                pending = None
                continue  # look at this step again on what onnx produced
            held = _apply_step(scope, version)
            if _onnx_affected_unheld(scope.model, version, held):
                try:
                    converted = _onnx_step(scope.model, held, version, version - 1, scope)
                except OnnxStepError as e:
                    raise _blame(scope.model, version, e, held) from e
                scope = scope.after(converted)
            else:
                _set_opset(scope.model, version - 1)
                _relabelled(scope, version)
            # a constant a rewrite made unused must not be carried (and refused) further
            _drop_orphans(scope.model, dead)
        elif _onnx_affected(scope.model, version, ops):
            pending = version if pending is None else pending
        elif pending is None:
            _set_opset(scope.model, version - 1)
            _relabelled(scope, version)
        version -= 1
    if pending is not None:
        scope = scope.after(_flush(scope.model, pending, target, scope.used))
    _set_opset(scope.model, target)
    _drop_orphans(scope.model, dead)
    return scope.model


def _relabelled(scope: _Scope, version: int) -> None:
    """The model went from opset *version* to the one below by its label alone.

    Types inferred at *version* on a model no rewrite has changed since are
    kept for the next step (the nodes that crossed it kept their inputs, outputs
    and types); inference runs again only after a rewrite.
    """
    unchanged = scope.typed_at == version and not scope.rewrote
    scope.typed_at = version - 1 if unchanged else -1
    scope.rewrote = False


def _used_names(model: onnx.ModelProto) -> set[str]:
    used = {o.name for o in model.graph.output}
    for graph, _ in _graphs(model.graph, "graph"):
        used.update(o.name for o in graph.output)
        for node in graph.node:
            used.update(node.input)
    return used


def _dead_constants(model: onnx.ModelProto) -> set[str]:
    """Initializers and Constant outputs nothing uses (the model's own dead values)."""
    used = _used_names(model)
    dead: set[str] = set()
    for graph, _ in _graphs(model.graph, "graph"):
        dead.update(t.name for t in graph.initializer if t.name not in used)
        dead.update(n.output[0] for n in graph.node
                    if n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS
                    and n.output and n.output[0] not in used)
    return dead


def _drop_orphans(model: onnx.ModelProto, dead_before: set[str]) -> None:
    """Remove constants a rewrite stopped using (Pad's old pads, a Squeeze's axes
    Constant once they are an attribute), and only those: values the input itself
    left unused stay, and so do graph inputs (they are the interface)."""
    used = _used_names(model)
    for graph, _ in _graphs(model.graph, "graph"):
        keep = used | dead_before | {v.name for v in graph.input}

        def orphan(name: str, keep: set[str] = keep) -> bool:
            return name not in keep

        if any(orphan(t.name) for t in graph.initializer):
            kept = [t for t in graph.initializer if not orphan(t.name)]
            del graph.initializer[:]
            graph.initializer.extend(kept)
        if any(n.op_type == "Constant" and n.output and orphan(n.output[0])
               for n in graph.node):
            nodes = [n for n in graph.node
                     if not (n.op_type == "Constant" and n.domain in DEFAULT_DOMAINS
                             and n.output and orphan(n.output[0]))]
            del graph.node[:]
            graph.node.extend(nodes)


def _onnx_affected_unheld(model: onnx.ModelProto, version: int,
                          keys: set[_Key]) -> bool:
    return any(_affected(n, version) and _key(n) not in keys
               for g, _ in _graphs(model.graph, "graph") for n in g.node)


def _flush(model: onnx.ModelProto, source: int, target: int,
           used: set[tuple[str, int]]) -> onnx.ModelProto:
    """onnx's converter from *source* down to *target* for steps only onnx works in.

    One call when it goes through; otherwise step by step, so that nodes onnx's
    own adapters produce get streamconv's handling where they need it.
    """
    try:
        return _run_onnx(model, target)
    except OnnxStepError:
        pass  # find the step, and the node, it trips on
    work = model
    for version in range(source, target, -1):
        step_model = onnx.ModelProto()
        step_model.CopyFrom(work)
        _set_opset(step_model, version)
        if _needs_streamconv(step_model, version):
            work = convert_down(step_model, version - 1, steps_used=used)
            continue
        try:
            work = _run_onnx(step_model, version - 1)
        except OnnxStepError as e:
            raise _blame(step_model, version, e, set()) from e
    return work


def _blame(model: onnx.ModelProto, version: int, error: OnnxStepError,
           held: set[_Key]) -> StepError:
    """A StepError naming the node onnx's adapter refused at step version -> version-1."""
    text = str(error)
    reason = text.split("failed: ", 1)[1] if "failed: " in text else text
    reason = re.sub(r"DataType \((\d+)\)", lambda m: _type_name(int(m.group(1))), reason)
    candidates = []
    for graph, path in _graphs(model.graph, "graph"):
        for i, node in enumerate(graph.node):
            if _affected(node, version) and _key(node) not in held:
                candidates.append((node, path, i))
    named = [c for c in candidates if c[0].op_type in reason] or _culprits(
        model, version, candidates, held) or candidates
    if not named:
        return StepError(Obstacle(version, "?", "?", "graph", f"onnx's converter: {reason}"))
    node, path, i = named[0]
    name, where = _describe(node, path, i)
    return StepError(Obstacle(version, node.op_type, name, where,
                              f"onnx's adapter refuses it: {reason}"))


def _culprits(model: onnx.ModelProto, version: int,
              candidates: list[tuple[onnx.NodeProto, str, int]], held: set[_Key]
              ) -> list[tuple[onnx.NodeProto, str, int]]:
    """The candidates onnx trips on when it adapts them alone (the others held).

    Only on the error path: one onnx call per op type, then per node of the
    failing type while there are few.
    """
    scope = _Scope(model)
    scope.refresh(version)
    everyone = {_key(c[0]) for c in candidates} | held

    def fails(group: list[tuple[onnx.NodeProto, str, int]]) -> bool:
        keys = everyone - {_key(c[0]) for c in group}
        try:
            _onnx_step(model, keys, version, version - 1, scope)
        except OnnxStepError:
            return True
        return False

    ops = list(dict.fromkeys(c[0].op_type for c in candidates))
    if len(ops) < 2 and len(candidates) > 16:
        return []
    for op in ops:
        group = [c for c in candidates if c[0].op_type == op]
        if len(ops) > 1 and not fails(group):
            continue
        if len(group) <= 16:
            single = [c for c in group if fails([c])]
            return single or group
        return group
    return []


def _type_name(elem_type: int) -> str:
    try:
        return f"element type {onnx.TensorProto.DataType.Name(elem_type)}"
    except ValueError:
        return f"element type {elem_type}"


def lowest_opset(model: onnx.ModelProto) -> tuple[int, Obstacle | None]:
    """The lowest ai.onnx opset *model* converts down to, and what stops it there.

    Converts a copy of the (small) skeleton in memory; nothing is written.
    """
    try:
        convert_down(model, 1)
    except StepError as e:
        return e.obstacle.step, e.obstacle
    return 1, None
