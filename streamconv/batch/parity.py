"""``--verify``: the original and the converted model run in ONNX Runtime on the same inputs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import onnx

from ..api import DEFAULT_THRESHOLD
from ..errors import StreamconvError
from ..splice import INLINE_LIMIT
from .plan import probe_model

#: Tolerances of --verify, per element type of an output (float16/bfloat16 are coarser).
VERIFY_TOLERANCE = {"default": (1e-3, 1e-5), "half": (1e-2, 1e-2)}

@dataclass(frozen=True)
class Parity:
    """Outcome of running two models on the same inputs.

    *ok* is True (outputs match), False (they differ, or the converted model
    does not run where the original does) or None (not checked, *detail* says why).
    """

    ok: bool | None
    detail: str


class _NotCheckable(Exception):
    pass


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("…" if len(text) > 300 else "")


def _random_value(vtype: onnx.TypeProto, rng: Any) -> Any:
    import numpy as np

    kind = vtype.WhichOneof("value")
    if kind == "tensor_type":
        tensor = vtype.tensor_type
        # Symbolic or unknown dimensions become 1; an unknown rank becomes [1].
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim] \
            if tensor.HasField("shape") else [1]
        if tensor.elem_type == onnx.TensorProto.STRING:
            return np.full(shape, "a", dtype=object)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        except Exception as e:
            raise _NotCheckable(f"no random input for element type {tensor.elem_type}") from e
        if dtype.kind == "f":
            return rng.standard_normal(shape).astype(dtype)
        if dtype.kind in "iu":
            # 1 and 2, never 0: an integer division by zero may crash a runtime.
            return rng.integers(1, 3, shape).astype(dtype)
        if dtype.kind == "b":
            return rng.integers(0, 2, shape).astype(bool)
        raise _NotCheckable(f"no random input for element type {dtype}")
    if kind == "sequence_type":
        return [_random_value(vtype.sequence_type.elem_type, rng)]
    if kind == "optional_type":
        return _random_value(vtype.optional_type.elem_type, rng)
    raise _NotCheckable(f"no random input for a {kind or 'untyped'} input")


def _read_value(path: str, vtype: onnx.TypeProto | None) -> tuple[str, Any]:
    from onnx import numpy_helper

    with open(path, "rb") as f:
        data = f.read()
    kind = vtype.WhichOneof("value") if vtype is not None else "tensor_type"
    proto: Any
    if kind == "sequence_type":
        proto = onnx.SequenceProto.FromString(data)
        return proto.name, numpy_helper.to_list(proto)
    if kind == "optional_type":
        proto = onnx.OptionalProto.FromString(data)
        return proto.name, numpy_helper.to_optional(proto)
    if kind == "map_type":
        proto = onnx.MapProto.FromString(data)
        return proto.name, numpy_helper.to_dict(proto)
    proto = onnx.TensorProto.FromString(data)
    return proto.name, numpy_helper.to_array(proto)


def _feeds(original: str, seed: int) -> tuple[list[dict[str, Any]], str]:
    """Input sets for *original*: its test_data_set_* folders, else one seeded random set."""
    import numpy as np

    model = probe_model(original, DEFAULT_THRESHOLD).model
    initializers = {t.name for t in model.graph.initializer}
    real = [v for v in model.graph.input if v.name not in initializers]
    types = {v.name: v.type for v in model.graph.input}
    folder = os.path.dirname(os.path.abspath(original))
    sets = sorted(
        d for d in os.listdir(folder)
        if d.startswith("test_data_set_") and os.path.isdir(os.path.join(folder, d))
    )
    feeds: list[dict[str, Any]] = []
    for name in sets:
        listing = os.listdir(os.path.join(folder, name))
        files = sorted((f for f in listing if re.fullmatch(r"input_\d+\.pb", f)),
                       key=lambda f: int(f[6:-3]))
        feed: dict[str, Any] = {}
        for i, f in enumerate(files):
            # Data sets name their tensors after the inputs; fall back to position.
            guess = real[i].name if i < len(real) else None
            stored, _ = _read_value(os.path.join(folder, name, f), types.get(guess or ""))
            key = stored if stored in types else guess
            if key is None:
                raise _NotCheckable(f"{name}/{f} matches no graph input")
            _, feed[key] = _read_value(os.path.join(folder, name, f), types[key])
        feeds.append(feed)
    if feeds:
        return feeds, ", ".join(sets)
    rng = np.random.default_rng(seed)
    return [{v.name: _random_value(v.type, rng) for v in real}], f"seeded random inputs ({seed})"


def _differs(a: Any, b: Any, where: str) -> str | None:
    import numpy as np

    if a is None or b is None:
        return None if a is None and b is None else f"{where}: one output is empty"
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return f"{where}: maps differ"
        return next((d for k in a if (d := _differs(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return f"{where}: sequences differ in length"
        return next((d for i, (x, y) in enumerate(zip(a, b, strict=True))
                     if (d := _differs(x, y, f"{where}[{i}]"))), None)
    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return f"{where}: shape {list(x.shape)} vs {list(y.shape)}"
    if x.dtype != y.dtype:
        return f"{where}: type {x.dtype} vs {y.dtype}"
    if x.dtype.kind in "fc":
        rtol, atol = VERIFY_TOLERANCE["half" if x.dtype.itemsize <= 2 else "default"]
        if not np.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            worst = float(np.nanmax(np.abs(x.astype(np.float64) - y.astype(np.float64))))
            return f"{where}: values differ (max abs diff {worst:.3g}, rtol {rtol}, atol {atol})"
        return None
    return None if np.array_equal(x, y) else f"{where}: values differ"


def verify_parity(original: str, converted: str, *, seed: int = 0) -> Parity:
    """Run *original* and *converted* in ONNX Runtime on the same inputs and compare.

    Inputs are the ``test_data_set_*`` folders beside *original*, else one set
    of seeded random values built from the declared input types (symbolic
    dimensions set to 1).  Never raises for a model problem: the Parity says
    what was found.  ONNX Runtime loads both models whole, so memory follows
    model size here, unlike conversion.
    """
    import onnxruntime as ort

    if os.path.getsize(original) > INLINE_LIMIT:
        return Parity(None, "not checked: the original is over 2 GiB inline; "
                            "ONNX Runtime cannot load it")
    try:
        feeds, origin = _feeds(original, seed)
    except (_NotCheckable, StreamconvError, OSError, ValueError, TypeError) as e:
        return Parity(None, f"not checked: {_short(e)}")
    options = ort.SessionOptions()
    # Workers already run in parallel; one thread each keeps the machine from thrashing.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    providers = ["CPUExecutionProvider"]
    try:
        reference = ort.InferenceSession(original, options, providers=providers)
        expected = [reference.run(None, feed) for feed in feeds]
        again = [reference.run(None, feed) for feed in feeds]
    except Exception as e:
        return Parity(None, f"not checked: ONNX Runtime cannot run the original: {_short(e)}")
    for i, (first, second) in enumerate(zip(expected, again, strict=True)):
        if any(_differs(a, b, "") for a, b in zip(first, second, strict=True)):
            return Parity(None, f"not checked: the original's outputs vary between runs "
                                f"(input set {i})")
    try:
        session = ort.InferenceSession(converted, options, providers=providers)
        actual = [session.run(None, feed) for feed in feeds]
    except Exception as e:
        return Parity(False, f"ONNX Runtime cannot run the converted model: {_short(e)}")
    names = [o.name for o in reference.get_outputs()]
    for feed_outputs, got in zip(expected, actual, strict=True):
        if len(feed_outputs) != len(got):
            return Parity(False, f"{len(got)} outputs instead of {len(feed_outputs)}")
        for name, a, b in zip(names, feed_outputs, got, strict=True):
            diff = _differs(a, b, f"output {name!r}")
            if diff is not None:
                return Parity(False, f"mismatch on {origin}: {diff}")
    return Parity(True, f"match on {origin}")
