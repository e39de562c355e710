"""What an adapter sees of the graph around the node it rewrites.

An adapter is a function ``(node, ctx) -> list[NodeProto]`` registered for one
(op type, since_version) with :func:`adapter`.  It crosses the opset step
``since_version -> since_version - 1`` for that node: the nodes it returns
replace the node in place and must be valid at ``ctx.opset`` (the older
opset).  It never touches payloads: values it needs (axes, pads, split
sizes…) come from :meth:`StepContext.value_of`, which reads only constants
the skeleton keeps inline.  An adapter that cannot cross the step for this
node raises :class:`Refusal` with the reason in words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Refusal",
    "StepContext",
    "adapter",
    "attribute",
    "tensor_value",
    "without",
]


class Refusal(Exception):
    """This node cannot cross this opset step; the message says why."""


@dataclass
class StepContext:
    """The node's surroundings at one opset step.

    ``opset`` is the version the step goes to; ``types`` maps value names to
    inferred types (a name may be missing where inference could not tell);
    ``constants`` maps value names to the tensors of initializers and Constant
    nodes visible from the node's graph (stubbed payloads are left out).
    """

    opset: int
    types: dict[str, onnx.TypeProto]
    constants: dict[str, onnx.TensorProto]
    names: set[str]
    where: str = ""
    #: a counter shared by every context of one conversion, for fresh names
    serial: list[int] = field(default_factory=lambda: [0])
    #: the (op, version) rows streamconv crossed itself in this conversion
    steps_used: set[tuple[str, int]] = field(default_factory=set)

    # -- what is known -------------------------------------------------------------
    def type_of(self, name: str) -> onnx.TypeProto | None:
        return self.types.get(name)

    def elem_type(self, name: str) -> int | None:
        """Element type of tensor *name*, or None when unknown or not a tensor."""
        t = self.types.get(name)
        if t is None or t.WhichOneof("value") != "tensor_type":
            return None
        return int(t.tensor_type.elem_type) or None

    def shape_of(self, name: str) -> list[int | None] | None:
        """Dimensions of tensor *name* (None for a symbolic one), or None if the rank is unknown."""
        t = self.types.get(name)
        if t is None or t.WhichOneof("value") != "tensor_type":
            return None
        if not t.tensor_type.HasField("shape"):
            return None
        return [
            int(d.dim_value) if d.HasField("dim_value") else None
            for d in t.tensor_type.shape.dim
        ]

    def rank_of(self, name: str) -> int | None:
        shape = self.shape_of(name)
        return None if shape is None else len(shape)

    def value_of(self, name: str) -> np.ndarray | None:
        """The value of *name* if it is a constant kept in the skeleton, else None."""
        if not name:
            return None
        tensor = self.constants.get(name)
        if tensor is None:
            return None
        return tensor_value(tensor, repr(name))

    # -- what an adapter makes -----------------------------------------------------
    def fresh(self, base: str) -> str:
        """A value or node name used nowhere in the model."""
        while True:
            self.serial[0] += 1
            name = f"{base}__sc{self.serial[0]}"
            if name not in self.names:
                self.names.add(name)
                return name

    def constant(self, value: Any, base: str = "const", dtype: Any = None
                 ) -> tuple[onnx.NodeProto, str]:
        """A Constant node holding *value* and the name of its output."""
        array = np.asarray(value, dtype=dtype)
        out = self.fresh(base)
        node = helper.make_node(
            "Constant", [], [out], name=self.fresh(base),
            value=numpy_helper.from_array(array, name=out),
        )
        self.constants[out] = node.attribute[0].t
        return node, out

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1,
             base: str = "", **attrs: Any) -> onnx.NodeProto:
        """A new ai.onnx node; ``outputs`` as a count makes fresh output names."""
        base = base or op.lower()
        if isinstance(outputs, int):
            outputs = [self.fresh(base) for _ in range(outputs)]
        return helper.make_node(op, inputs, outputs, name=self.fresh(base), **attrs)


def tensor_value(tensor: onnx.TensorProto, what: str) -> np.ndarray:
    """The values of a (small, inline) *tensor*; Refusal when they do not fit its dims."""
    try:
        return numpy_helper.to_array(tensor)
    except Exception as e:  # malformed: too few values for its dims, an unknown type…
        raise Refusal(f"the constant {what} cannot be read: {e}") from e


Adapter = Callable[[onnx.NodeProto, StepContext], list[onnx.NodeProto]]

#: (op type, since_version) -> adapter crossing since_version -> since_version - 1
ADAPTERS: dict[tuple[str, int], Adapter] = {}


def adapter(op: str, *versions: int) -> Callable[[Adapter], Adapter]:
    """Register the decorated function as the adapter of *op* at each of *versions*."""

    def register(fn: Adapter) -> Adapter:
        for v in versions:
            if (op, v) in ADAPTERS:
                raise ValueError(f"two adapters for {op} {v}")
            ADAPTERS[(op, v)] = fn
        return fn

    return register


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of *node*'s attribute *name*, or *default*."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def without(node: onnx.NodeProto, *names: str) -> onnx.NodeProto:
    """A copy of *node* without the attributes *names*."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    kept = [a for a in node.attribute if a.name not in names]
    del out.attribute[:]
    out.attribute.extend(kept)
    return out
