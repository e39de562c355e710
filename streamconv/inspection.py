"""What a model holds, without loading its weights: ``streamconv inspect``.

The model is scanned with the same wire-format scanner a conversion uses, with
every tensor payload set aside (threshold 0), so the accounting covers every
byte: payload bytes by storage and by place, and the message structure that is
left.  Only the small skeleton is ever parsed, whatever the file's size.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from . import fields as F
from .api import DEFAULT_THRESHOLD, mapped_input, reachable, remote_scope
from .errors import StreamconvError
from .skeleton import (
    Payload,
    _external_payload,
    _graphs_of,
    analyze_skeleton,
    iter_stub_tensors,
    scan_payloads,
    stub_id,
)
from .splice import INLINE_LIMIT

__all__ = ["Inspection", "TensorInfo", "inspect_model"]

#: How many of the largest tensors an inspection lists.
LARGEST = 10

#: Storage kinds, as the report names them.
RAW_DATA = "raw_data"
TYPED_FIELDS = "typed_fields"
EXTERNAL = "external"

#: Where a tensor sits, as the report names it.
PLACES = ("initializer", "constant", "subgraph", "function", "training_info", "sparse")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor payload: where it sits in the model and where its bytes are."""

    path: str
    name: str
    data_type: str
    dims: list[int]
    #: raw_data, typed_fields or external
    storage: str
    #: initializer, constant, subgraph, function, training_info or sparse
    place: str
    #: bytes as stored (for typed fields: the packed field's length)
    stored_bytes: int
    #: bytes as raw_data (what a conversion writes)
    nbytes: int
    #: the external-data file, relative to the model's folder (None when inline)
    location: str | None = None


@dataclass
class Inspection:
    """Everything ``streamconv inspect`` reports about one model.

    ``bytes`` adds up: for an inline model ``raw_data + typed_fields + structure``
    is the file size; ``external`` is the sum of the ranges the model's external
    tensors reference (per file in ``external_files``).
    """

    source: str
    file_size: int
    ir_version: int
    producer: str
    opsets: dict[str, int]
    nodes: int
    nodes_by_place: dict[str, int]
    ops: dict[str, int]
    tensors: dict[str, int]
    bytes: dict[str, int]
    tensors_by_place: dict[str, int]
    bytes_by_place: dict[str, int]
    external_files: dict[str, int]
    largest: list[TensorInfo]
    functions: list[dict[str, Any]]
    training_info: int
    conversion: dict[str, Any]
    reachable: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _place(path: str) -> str:
    """Where the tensor at field path *path* sits (the innermost container decides)."""
    if path.startswith("functions["):
        return "function"
    if path.startswith("training_info["):
        return "training_info"
    if ".g." in path or ".graphs[" in path:
        return "subgraph"
    if "sparse" in path:
        return "sparse"
    if ".node[" in path:
        return "constant"
    return "initializer"


def _type_name(data_type: int) -> str:
    entry = F.DATA_TYPES.get(data_type)
    return entry[0] if entry else f"type {data_type}"


def _info(payload: Payload, base: str, storage: str, place: str) -> TensorInfo:
    location = None
    if payload.external and "://" in base:  # a remote model: its data below its folder
        folder = base.rsplit("/", 1)[0] + "/"
        location = payload.source.removeprefix(folder)
    elif payload.external:
        location = os.path.relpath(payload.source, base).replace(os.sep, "/")
    return TensorInfo(
        path=payload.path, name=payload.name, data_type=_type_name(payload.data_type),
        dims=list(payload.dims), storage=storage, place=place,
        stored_bytes=payload.length, nbytes=payload.nbytes, location=location,
    )


def inspect_model(
    src: str | os.PathLike[str], *, size_threshold: int = DEFAULT_THRESHOLD, reach: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Inspection:
    """Describe the model at *src*; its weights are never read.

    *size_threshold* is the conversion option the "what a conversion would do"
    part assumes.  With *reach*, the reachable opset range is worked out too
    (the skeleton is converted in memory; seconds on very large graphs).
    Raises StreamconvError (one line) for a file that is not a readable model
    or whose external-data references are unusable.  *src* may be a URL
    (opened with *storage_options*): only the skeleton's bytes are fetched.
    """
    src = os.fspath(src)
    if src.startswith(("file://", "local://")):
        from .storage import local_path

        src = local_path(src)
    with remote_scope(src):
        return _inspect(src, size_threshold, reach, storage_options)


def _inspect(src: str, size_threshold: int, reach: bool,
             storage_options: dict[str, Any] | None) -> Inspection:
    with mapped_input(src, storage_options) as (buf, size):
        try:
            # Threshold 0: every payload is set aside, so every byte is accounted for.
            data, payloads = scan_payloads(buf, size, src, 0)
            skeleton = analyze_skeleton(data, payloads, src, for_conversion=False)
        except StreamconvError as e:
            raise e.with_file(src) from e.__cause__
    model = skeleton.model
    # a remote model's data is resolved against its URL (see skeleton._safe_location)
    base = src if "://" in src else os.path.dirname(os.path.abspath(src))

    infos: list[TensorInfo] = []
    for payload in payloads.values():
        storage = RAW_DATA if payload.encoding == "raw" else TYPED_FIELDS
        infos.append(_info(payload, base, storage, _place(payload.path)))
    # External tensors stay references in the skeleton; their keys are checked the
    # way a conversion checks them, and no data byte is read.
    external_files: Counter[str] = Counter()
    for tensor, _, path in iter_stub_tensors(model):
        if tensor.data_location != tensor.EXTERNAL or stub_id(tensor) is not None:
            continue
        try:
            payload = _external_payload(tensor, 0, base, src, path)
        except StreamconvError as e:
            raise e.with_file(src) from e
        info = _info(payload, base, EXTERNAL, _place(path))
        infos.append(info)
        external_files[info.location or ""] += payload.length

    tensors = Counter(i.storage for i in infos)
    stored = Counter[str]()
    for i in infos:
        stored[i.storage] += i.stored_bytes
    inline_payload = stored[RAW_DATA] + stored[TYPED_FIELDS]
    byte_counts = {
        RAW_DATA: stored[RAW_DATA],
        TYPED_FIELDS: stored[TYPED_FIELDS],
        "structure": size - inline_payload,
        EXTERNAL: stored[EXTERNAL],
    }
    by_place = {p: sum(1 for i in infos if i.place == p) for p in PLACES}
    bytes_by_place = {p: sum(i.nbytes for i in infos if i.place == p) for p in PLACES}

    ops: Counter[str] = Counter()
    nodes_by_place = dict.fromkeys(("graph", "subgraph", "function", "training_info"), 0)
    containers: list[tuple[str, Any]] = []
    for n, g in enumerate(_graphs_of(model.graph)):
        containers.append(("graph" if n == 0 else "subgraph", g))
    for info in model.training_info:
        for root in (info.initialization, info.algorithm):
            containers += [("training_info", g) for g in _graphs_of(root)]
    for fn in model.functions:
        containers.append(("function", fn))
        for node in fn.node:
            for attr in node.attribute:
                for root in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    containers += [("function", g) for g in _graphs_of(root)]
    for key, container in containers:
        nodes_by_place[key] += len(container.node)
        for node in container.node:
            ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx")
                else node.op_type] += 1

    opsets: dict[str, int] = {}
    for o in model.opset_import:
        opsets[o.domain or "ai.onnx"] = o.version

    # What convert would do with the size threshold given: the payloads above it
    # move (external ones always), tensors whose values the converter reads stay.
    diverted = [i for i in infos if i.storage == EXTERNAL or i.stored_bytes > size_threshold]
    kept = sum(i.stored_bytes for i in infos if i.storage != EXTERNAL) - sum(
        i.stored_bytes for i in diverted if i.storage != EXTERNAL)
    # an estimate: typed fields become raw_data, and stubs and headers are ignored
    out_size = size - inline_payload + kept + sum(i.nbytes for i in diverted)
    conversion = {
        "size_threshold": size_threshold,
        "tensors_diverted": len(diverted),
        "bytes_diverted": sum(i.nbytes for i in diverted),
        "estimated_inline_size": out_size,
        "layout_auto": "inline" if out_size <= INLINE_LIMIT else "external",
    }

    inspection = Inspection(
        source=src, file_size=size, ir_version=model.ir_version,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        opsets=opsets, nodes=sum(nodes_by_place.values()), nodes_by_place=nodes_by_place,
        ops=dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        tensors={k: tensors.get(k, 0) for k in (RAW_DATA, TYPED_FIELDS, EXTERNAL)},
        bytes=byte_counts, tensors_by_place=by_place, bytes_by_place=bytes_by_place,
        external_files=dict(sorted(external_files.items())),
        largest=sorted(infos, key=lambda i: (-i.nbytes, i.path))[:LARGEST],
        functions=[{"domain": fn.domain, "name": fn.name, "nodes": len(fn.node),
                    "opsets": {o.domain or "ai.onnx": o.version for o in fn.opset_import}}
                   for fn in model.functions],
        training_info=len(model.training_info),
        conversion=conversion,
    )
    if reach:
        try:
            r = reachable(src, size_threshold=size_threshold, storage_options=storage_options)
        except StreamconvError as e:
            # The model is readable (the scan above succeeded) but cannot be converted:
            # that is a finding about it, not a failure of inspect.
            inspection.warnings.append(f"reachable range unknown: {e.message}")
        else:
            inspection.reachable = {"opset": r.opset, "lowest": r.lowest, "highest": r.highest,
                                    "below": r.below, "above": r.above}
    return inspection
