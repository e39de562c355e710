"""Public entry point: convert one model file, with a report of what was done."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from .errors import ConversionError, OutputError, StreamconvError, UsageError, WireFormatError
from .publish import Staging, check_destination, previous_data_files, publish, signals_held
from .scan import map_file
from .skeleton import MARKER, Payload, Skeleton, analyze_skeleton, build_skeleton, scan_payloads
from .splice import (
    INLINE_LIMIT,
    OutputPlan,
    Prefix,
    SidecarWriter,
    Tail,
    plan_output,
    plan_prefix,
    plan_tail,
    split_converted,
    stream_plan,
    write_plan,
)
from .writer import Background, stream_pieces, write_pieces

__all__ = ["LAYOUTS", "Report", "convert", "roundtrip"]

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "inline", "external")
DEFAULT_THRESHOLD = 1024
DEFAULT_ALIGN = 1 << 16
ALIGN_MIN = 1 << 20
#: payloads at least this large are copied while the skeleton converts
EARLY_MIN = 64 << 10

#: progress(done_bytes, total_bytes)
ProgressCallback = Callable[[int, int], None]


@dataclass
class Report:
    """What one conversion did."""

    source: str
    destination: str
    data_file: str | None
    opset_from: int
    opset_to: int
    layout: str
    tensors_diverted: int
    bytes_diverted: int
    bytes_in: int
    bytes_out: int
    seconds: float
    check: str
    warnings: list[str] = field(default_factory=list)
    #: ``[lowest, highest]`` opset the input converts to (with ``reach=True``)
    reachable: list[int] | None = None
    #: for a remote input: bytes fetched from storage (skeleton and payloads), and requests
    bytes_fetched: int | None = None
    requests: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _validate_options(layout: str, size_threshold: int, align: int, data_name: str | None) -> None:
    if layout not in LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not isinstance(size_threshold, int) or size_threshold < 0:
        raise UsageError(f"--size-threshold must be >= 0, got {size_threshold}")
    if not isinstance(align, int) or align < 1 or align & (align - 1) or align > 1 << 16:
        raise UsageError(f"--align must be a power of two from 1 to 65536, got {align}")
    if data_name is not None:
        norm = os.path.normpath(data_name)
        if (
            not data_name
            or os.path.isabs(data_name)
            or norm.startswith("..")
            or norm in (".", "")
            or data_name.endswith(("/", os.sep))
        ):
            raise UsageError(
                f"--data-name must be a relative file path inside the output's folder, "
                f"got {data_name!r}"
            )


def _is_url(path: str) -> bool:
    """Whether *path* is a remote URL; imports the storage module only for ``://`` paths."""
    if "://" not in path:
        return False
    from .storage import is_url

    return is_url(path)


def _local(path: str) -> str:
    """*path* without a ``file://`` prefix."""
    if "://" not in path:
        return path
    from .storage import local_path

    return local_path(path)


def _same_file(a: str, b: str) -> bool:
    if _is_url(a) or _is_url(b):
        return a == b
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _load_onnx() -> ModuleType:
    """Import the converter stage (and onnx) with SIGINT/SIGTERM held.

    A Python signal handler that raises while onnx's C++ extension initializes
    aborts the interpreter; held signals are delivered right after the import.
    """
    loaded = sys.modules.get(f"{__package__}.converter")
    if loaded is not None:  # imported already: nothing to hold signals for
        return loaded
    with signals_held():
        from . import converter
    return converter


def open_input(src: str) -> tuple[int, int]:
    """Open a model read-only; refuse anything but a non-empty regular file (no hang on FIFOs)."""
    try:
        # non-blocking, so that a named pipe cannot hang the open; checked just below
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as e:
        raise StreamconvError("no such file", file=src) from e
    except IsADirectoryError as e:
        raise StreamconvError("is a folder, not a model file", file=src) from e
    except OSError as e:
        raise StreamconvError(f"cannot open: {e.strerror}", file=src) from e
    info = os.fstat(fd)
    size = info.st_size
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise StreamconvError("is a folder, not a model file", file=src)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StreamconvError("not a regular file", file=src)
    if size == 0:
        os.close(fd)
        raise WireFormatError("empty file, not an ONNX model", file=src)
    return fd, size


@contextlib.contextmanager
def remote_scope(src: str) -> Iterator[None]:
    """For a URL *src*: the remote files opened inside are closed after (see
    :func:`streamconv.storage.opened`); for a local path, nothing."""
    if not _is_url(src):
        yield
        return
    from . import storage

    with storage.opened():
        yield


@contextlib.contextmanager
def mapped_input(src: str, storage_options: dict[str, Any] | None = None
                 ) -> Iterator[tuple[Any, int]]:
    """The model at *src* opened read-only and mapped: ``(buffer, size)``; closed after.

    For a URL, a buffer over ranged reads, inside the caller's :func:`remote_scope`.
    """
    if _is_url(src):
        scanned, remote_size, _ = _open_model(src, storage_options)
        yield scanned, remote_size
        return
    fd, size = open_input(src)
    buf: Any = None
    try:
        buf = map_file(fd, size)
        yield buf, size
    finally:
        if buf is not None and hasattr(buf, "close"):
            buf.close()
        os.close(fd)


class _Checker:
    """onnx's full check of serialized skeletons without their payloads.

    Each stub's location (``__streamconv__/<id>``) is made a sparse file of the
    payload's size in a scratch folder, so a check costs what the skeleton
    costs, whatever the size of the weights.  A skeleton without stubs has no
    external tensor at all (the input's own external data is stubbed too), so
    it is checked in memory: the checker reads files only for external data.
    """

    def __init__(self, payloads: dict[int, Any], workdir: str) -> None:
        self.folder: str | None = None
        self.path = ""
        if not payloads:
            return
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="check-", dir=workdir)
        stub_dir = os.path.join(self.folder, MARKER.rstrip("/"))
        os.mkdir(stub_dir)
        for ident, payload in payloads.items():
            with open(os.path.join(stub_dir, str(ident)), "wb") as f:
                f.truncate(payload.nbytes)
        self.path = os.path.join(self.folder, "check.onnx")

    def error(self, model_bytes: bytes) -> str | None:
        """The checker's error on *model_bytes*, one stripped line per line, or None."""
        import onnx

        if self.folder is not None:
            with open(self.path, "wb") as f:
                f.write(model_bytes)
        try:
            onnx.checker.check_model(self.path if self.folder is not None else model_bytes,
                                     full_check=True)
        except Exception as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            return "\n".join(lines) if lines else type(e).__name__
        return None

    def close(self) -> None:
        import shutil

        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


#: Most main-graph nodes :func:`_check` compares one by one; past it a result
#: that fails the checker is refused (each node costs one check of the skeleton).
MAX_COMPARED_NODES = 1000
MASKED_DOMAIN = "streamconv.masked"


def _masked(model: Any, keep: Any) -> bytes:
    """*model* with every main-graph node whose outputs are not in *keep* made opaque.

    An opaque node keeps its inputs and outputs but belongs to a domain no
    schema knows, so the checker neither checks it nor infers its outputs.
    """
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if tuple(node.output) not in keep:
            inputs, outputs = list(node.input), list(node.output)
            node.Clear()
            node.input.extend(inputs)
            node.output.extend(outputs)
            node.op_type, node.domain = "Opaque", MASKED_DOMAIN
    out.opset_import.add(domain=MASKED_DOMAIN, version=1)
    return bytes(out.SerializeToString())


def _node_errors(model: Any, checker: _Checker) -> dict[tuple[str, ...], str]:
    """The main-graph nodes that fail the checker, by their outputs, with each one's error.

    The checker stops at its first error, so nodes are made real one at a time
    in graph order: node *n* is checked with the nodes before it real (those
    found failing made opaque again) and the nodes after it opaque.  Each
    failing node is thus named with the first error it causes itself.
    """
    keys = _keys(model)
    failing: dict[tuple[str, ...], str] = {}
    for i, key in enumerate(keys):
        real = {k for k in keys[: i + 1] if k not in failing}
        error = checker.error(_masked(model, real))
        if error is not None:
            failing[key] = error
    return failing


def _check(converted: bytes, skeleton: Skeleton, workdir: str, notes: list[str]) -> None:
    """Refuse a converted model that fails onnx's checker, unless the input fails alike.

    The checker stops at its first error, so "alike" is judged node by node
    (see :func:`_node_errors`): every main-graph node that fails in the result
    must fail the same way in the input, and the input must not fail before
    the checker reaches its nodes.  Raises ConversionError otherwise.
    """
    import onnx

    checker = _Checker(skeleton.payloads, workdir)
    try:
        error = checker.error(converted)
        if error is None:
            return
        summary = " ".join(error.splitlines()[:3])
        refused = f"the converted model fails onnx.checker: {summary}"
        if checker.error(skeleton.model.SerializeToString()) is None:
            raise ConversionError(refused)
        result = onnx.ModelProto()
        result.ParseFromString(converted)
        nodes = max(len(result.graph.node), len(skeleton.model.graph.node))
        if nodes > MAX_COMPARED_NODES:
            raise ConversionError(
                f"{refused} (the input fails too, but with {nodes} nodes it is not compared "
                f"node by node; at most {MAX_COMPARED_NODES} are)"
            )
        frame = checker.error(_masked(skeleton.model, set()))
        if frame is not None:
            # it fails before the checker looks at any node: nothing can be compared
            raise ConversionError(
                f"{refused} (the input fails too, outside its nodes: "
                f"{' '.join(frame.splitlines()[:2])})"
            )
        before = _node_errors(skeleton.model, checker)
        after = _node_errors(result, checker)
        for key, message in after.items():
            if before.get(key) != message:
                first = " ".join(message.splitlines()[:3])
                raise ConversionError(
                    f"the converted model fails onnx.checker at the node making "
                    f"{', '.join(key)!r}, where the input does not fail so: {first}"
                )
        first = error.splitlines()[0]
        notes.append(f"the input already fails onnx.checker the same way: {first}")
        log.warning("the input already fails onnx.checker the same way: %s", first)
    finally:
        checker.close()


def _keys(model: Any) -> list[tuple[str, ...]]:
    """The outputs of every main-graph node, each tuple identifying its node."""
    return [tuple(node.output) for node in model.graph.node]


def _weights_first_tail(
    converted: bytes, result: Any, skeleton: Skeleton, prefix: Prefix, layout: str,
    allow_duplicates: bool,
) -> Tail | None:
    """Plan what follows an inline output's prefix, or None when the prefix no longer fits.

    The prefix holds the graph's initializers as they were scanned; it stands
    only if conversion left every one of them as it was, in the same place.
    (A tensor put back inline after the scan, because the converter reads its
    values, was written with its payload: it stands too if conversion left it
    alone.)
    """
    before = skeleton.model.graph.initializer
    after = result.model.graph.initializer
    count = prefix.count
    if len(before) != count or len(after) < count:
        log.info("conversion dropped initializers; writing the output in one pass")
        return None
    for index in range(count):
        if before[index] != after[index]:
            log.info("initializer %d changed in conversion; writing the output in one pass",
                     index)
            return None
    parts = split_converted(converted, count)
    if parts is None:
        return None
    graph_rest, model_rest = parts
    tail = plan_tail(graph_rest, model_rest, skeleton.payloads, prefix,
                     allow_duplicates=allow_duplicates)
    graph_length = prefix.length + tail.graph.length
    if graph_length >= 1 << (7 * prefix.width):
        return None
    if layout == "auto" and prefix.header_size + graph_length + tail.model.length > INLINE_LIMIT:
        return None  # auto means external past 2 GiB
    return tail


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    opset: int | None = None,
    layout: str = "auto",
    size_threshold: int = DEFAULT_THRESHOLD,
    data_name: str | None = None,
    align: int = DEFAULT_ALIGN,
    check: bool = True,
    checksum: bool = False,
    inline_functions: bool = False,
    reuse_data: bool = False,
    strict_onnx: bool = False,
    reach: bool = False,
    fsync: bool = True,
    progress: ProgressCallback | None = None,
    before_publish: Callable[[str], None] | None = None,
    storage_options: dict[str, Any] | None = None,
    folder_syncs: set[str] | None = None,
    staging: str | None = None,
) -> Report:
    """Convert the ONNX model at *src* to ai.onnx *opset* and write it to *dst*.

    *src* and *dst* may be fsspec URLs (``s3://``, ``gs://``, ``hf://``,
    ``http(s)://``, ...; see :mod:`streamconv.storage`), opened with
    *storage_options*: a remote input is read through ranged reads (the
    skeleton's bytes, then one sequential stream of the payloads), a remote
    output is uploaded and appears only when complete, its data object first.

    *opset* defaults to the newest opset the installed onnx knows.  *layout*
    is ``auto`` (inline under 2 GiB, else external data), ``inline`` or
    ``external``; the sidecar is named *data_name* (default ``<dst name>.data``)
    relative to dst's folder.  Tensor payloads over *size_threshold* bytes are
    never loaded.  *check* validates the result with onnx's checker before it
    is written; *checksum* records each external tensor's SHA-1;
    *inline_functions* inlines model-local functions before conversion;
    *reuse_data* references the input's own external-data files in place
    (where they lie inside the output's folder) instead of copying them.
    Downgrades cross one opset at a time with onnx's adapters where they are
    right and streamconv's own elsewhere; *strict_onnx* uses onnx's converter
    alone, as it is.  *reach* also works out the range of opsets the input
    converts to (``Report.reachable``; see :func:`reachable`).  The input is
    not modified; the output appears atomically, and a model in place
    never refers to a data file that is not its own, not even for a moment
    (see :mod:`streamconv.publish`).  With *fsync* (the default) the files and
    their folder are synced, so the output survives a power loss.  *progress*
    is called with (bytes written, bytes to write), possibly from a worker
    thread.  *before_publish* is called with the path of the finished model,
    still in its staging folder (its data file beside it), just before it is
    moved into place; an exception it raises aborts the publish and is
    passed on.  With *fsync* and a set *folder_syncs*, the folder sync after
    the model's last rename is left to the caller, who finds the folder in
    *folder_syncs* (:func:`streamconv.publish.sync_folders`; batch syncs each
    folder once per chunk of models); the files are synced all the same.
    *staging* names a staging folder of this process to stage the output in
    (see :class:`streamconv.publish.Staging`), used when it is on dst's file
    system; by default a new one is made beside dst.

    Raises UsageError for bad options, WireFormatError/LimitError for a
    malformed input, ExternalDataError for bad external-data references,
    ConversionError when onnx cannot convert the model, OutputError when the
    output cannot be written.
    """
    started = time.perf_counter()
    src, dst = _local(os.fspath(src)), _local(os.fspath(dst))
    _validate_options(layout, size_threshold, align, data_name)
    src_remote, dst_remote = _is_url(src), _is_url(dst)
    if reuse_data and layout == "inline":
        raise UsageError("--reuse-data needs --layout external or auto")
    if reuse_data and (src_remote or dst_remote):
        raise UsageError("--reuse-data needs a local input and output")
    if before_publish is not None and dst_remote:
        raise UsageError("a check before publishing (batch --verify) needs a local output",
                         file=dst)
    if reuse_data:
        layout = "external"
    if data_name is None:
        data_name = os.path.basename(dst) + ".data"
    data_name = data_name.replace(os.sep, "/")
    name = os.path.basename(dst)
    if os.path.normpath(data_name) == name:
        raise UsageError(f"--data-name {data_name!r} is the output's own name")
    job: _Job | _RemoteJob
    if dst_remote:
        from . import storage

        dst_data = storage.join(storage.parent(dst), data_name)
        if src in (dst, dst_data):
            raise UsageError("the output would overwrite the input", file=src)
        job = _RemoteJob(dst, progress, storage_options)
    else:
        dst_data = os.path.join(os.path.dirname(os.path.abspath(dst)), data_name)
        if os.path.exists(dst) and _same_file(src, dst):
            raise UsageError("the output would overwrite the input", file=src)
        if os.path.exists(dst_data) and _same_file(src, dst_data):
            raise UsageError("the output's data file would overwrite the input", file=src)
        folder = os.path.dirname(os.path.abspath(dst))
        if os.path.isdir(folder):  # a missing folder is reported when the output is created
            # before any work; the publish checks again, with the names it ends up using
            try:
                check_destination(folder, [name, data_name] if layout == "external" else [name])
            except OutputError as e:
                raise e.with_file(dst) from None
        job = _Job(dst, progress, fsync=fsync, before_publish=before_publish,
                   folder_syncs=folder_syncs, staging=staging)
    job.protect = [src]
    fetched: list[Any] = []
    with contextlib.ExitStack() as remotes:
        if src_remote:
            from . import storage

            fetched = remotes.enter_context(storage.opened())
        report = _convert_open(
            src, dst, dst_data, job, storage_options, opset=opset, layout=layout,
            size_threshold=size_threshold, data_name=data_name, align=align, check=check,
            checksum=checksum, inline_functions=inline_functions, reuse_data=reuse_data,
            strict_onnx=strict_onnx, reach=reach,
        )
    if fetched:
        report.bytes_fetched = sum(r.stats.bytes for r in fetched)
        report.requests = sum(r.stats.requests for r in fetched)
    report.seconds = time.perf_counter() - started
    return report


def _open_model(src: str, storage_options: dict[str, Any] | None) -> tuple[Any, int, int | None]:
    """The model at *src* for the scanner: ``(buffer, size, fd)`` (fd None for a URL)."""
    if _is_url(src):
        from . import storage

        remote = storage.open_remote(src, storage_options)
        if remote.size == 0:
            raise WireFormatError("empty file, not an ONNX model", file=src)
        return remote.scan_buffer(), remote.size, None
    fd, size = open_input(src)
    try:
        return map_file(fd, size), size, fd
    except BaseException:
        os.close(fd)
        raise


def _convert_open(
    src: str, dst: str, dst_data: str, job: _Job | _RemoteJob,
    storage_options: dict[str, Any] | None, *, opset: int | None, layout: str,
    size_threshold: int, data_name: str, align: int, check: bool, checksum: bool,
    inline_functions: bool, reuse_data: bool, strict_onnx: bool, reach: bool,
) -> Report:
    """:func:`convert` once its options are checked and its output side is set up."""
    buf, size, fd = _open_model(src, storage_options)
    # payload bytes move early only between local files (see writer.Background)
    copy_early = fd is not None and isinstance(job, _Job)
    #: the inline output's weights-first prefix, when it is written after conversion
    late: Prefix | None = None
    try:
        try:
            data, payloads = scan_payloads(buf, size, src, size_threshold)
        except StreamconvError as e:
            raise e.with_file(src) from e.__cause__
        # Where the layout is already certain to be external, payload bytes
        # start moving now, while onnx loads and the skeleton converts.
        predicted = size + sum(p.nbytes - p.length for p in payloads.values())
        if layout == "external" or (layout == "auto" and predicted > INLINE_LIMIT + (1 << 20)):
            layout = "external"
            if copy_early:
                assert isinstance(job, _Job)
                job.start_sidecar(
                    data_name, [p for p in payloads.values() if p.nbytes >= EARLY_MIN],
                    align=align, checksum=checksum,
                )
        else:
            # Inline: the graph's initializers go first, so their payloads can
            # move now too (see splice.plan_prefix).
            # (without an early copy, the output is laid out the same way all the
            # same: the same input gives the same bytes, wherever it is read)
            prefix = plan_prefix(data, payloads)
            if prefix is not None and prefix.payload_bytes >= EARLY_MIN:
                if copy_early:
                    assert isinstance(job, _Job)
                    job.start_prefix(os.path.basename(dst), prefix)
                else:
                    late = prefix
        converter = _load_onnx()
        target = (
            converter.validate_target(opset) if opset is not None else converter.max_opset()
        )
        try:
            skeleton = analyze_skeleton(data, payloads, src)
        except StreamconvError as e:
            raise e.with_file(src) from e.__cause__
        sources = {p.source for p in skeleton.payloads.values()}
        job.protect += sorted(sources)
        for other in sources:
            for target_path in (dst, dst_data):
                if other == target_path or (
                    not _is_url(target_path) and os.path.exists(target_path)
                    and _same_file(other, target_path)
                ):
                    raise UsageError(
                        f"the output would overwrite the input's data file {other}", file=src
                    )
        if fd is None:
            # the payload stream: planned now, its first reads overlap the conversion
            from . import storage

            spans: dict[str, list[tuple[int, int]]] = {}
            for p in skeleton.payloads.values():
                spans.setdefault(p.source, []).append((p.offset, p.length))
            for url, ranges in spans.items():
                storage.reader(url).expect(ranges)
        opset_from = converter.default_opset(skeleton.model)
        try:
            result = converter.convert_model(
                skeleton.model, target, inline_functions=inline_functions,
                strict_onnx=strict_onnx,
            )
        except UnicodeError as e:
            # protobuf hands strings that are not UTF-8 over as bytes
            raise WireFormatError("a name or string in the model is not valid UTF-8",
                                  file=src) from e
        reach_range = None
        if reach:
            low, _, high, _ = converter.reach(skeleton.model, strict_onnx=strict_onnx)
            reach_range = [low, high]
        skeleton_bytes = result.model.SerializeToString()
        if check:
            _check(skeleton_bytes, skeleton, job.scratch, result.notes)
        tail = None
        early_prefix = job.prefix if isinstance(job, _Job) else None
        chosen = early_prefix or late
        if chosen is not None:
            tail = _weights_first_tail(skeleton_bytes, result, skeleton, chosen, layout,
                                       inline_functions)
            if tail is None and early_prefix is not None:
                assert isinstance(job, _Job)
                job.discard_prefix()
        if tail is not None and late is not None:
            graph_length = late.length + tail.graph.length
            written = job.write_in_order(
                [late.header(graph_length), *late.pieces, *tail.graph.pieces,
                 *tail.model.pieces], os.path.basename(dst))
            out_layout, has_data, reused = "inline", False, 0
        elif tail is not None:
            assert isinstance(job, _Job)
            written = job.write_weights_first(tail, os.path.basename(dst))
            out_layout, has_data, reused = "inline", False, 0
        else:
            early = job.sidecar
            plan = plan_output(
                skeleton_bytes, skeleton.payloads, layout,
                data_name=data_name, align=align, align_min=ALIGN_MIN, checksum=checksum,
                allow_duplicates=inline_functions,
                reuse_dir=os.path.dirname(os.path.abspath(dst)) if reuse_data else None,
                preplaced=early.offsets if early else None, start=early.end if early else 0,
            )
            if early is not None:
                dead = set(early.offsets) - set(skeleton.payloads)
                if dead:
                    log.info("%d payload(s) copied early were kept inline after all", len(dead))
            if layout == "inline" and plan.model_size > INLINE_LIMIT:
                log.info("inline output of %d bytes exceeds 2 GiB; only streaming readers can "
                         "load it", plan.model_size)
            written = job.write(plan, os.path.basename(dst))
            out_layout, has_data, reused = plan.layout, plan.has_data, plan.reused
    except ConversionError as e:
        raise e.with_file(src) from e.__cause__
    except OutputError as e:
        raise e.with_file(dst) from e.__cause__
    finally:
        job.close()
        if fd is not None:
            buf.close()
            os.close(fd)
    if reused:
        result.notes.append(f"{reused} tensor(s) reference the input's data files in place")
    return Report(
        source=src,
        destination=dst,
        data_file=dst_data if has_data else None,
        opset_from=opset_from,
        opset_to=target,
        layout=out_layout,
        tensors_diverted=len(skeleton.payloads),
        bytes_diverted=sum(p.nbytes for p in skeleton.payloads.values()),
        bytes_in=size,
        bytes_out=written,
        seconds=0.0,
        check="onnx.checker.check_model(full_check=True)" if check else "skipped",
        warnings=result.notes,
        reachable=reach_range,
    )


class _Job:
    """The output side of one conversion: temporary folder, files, early sidecar copy."""

    def __init__(self, dst: str, progress: ProgressCallback | None, *, fsync: bool = True,
                 before_publish: Callable[[str], None] | None = None,
                 folder_syncs: set[str] | None = None, staging: str | None = None) -> None:
        self.dst = dst
        self.progress = progress
        self.fsync = fsync
        self.before_publish = before_publish
        self.folder_syncs = folder_syncs
        self.staging = staging
        #: files the publish must never remove (the input and its data files)
        self.protect: list[str] = []
        self._out: Staging | None = None
        self.sidecar: SidecarWriter | None = None
        self.data_name: str | None = None
        self.data_fd: int | None = None
        #: inline output written weights first: the planned prefix, its file and copy
        self.prefix: Prefix | None = None
        self.model_name: str | None = None
        self.model_fd: int | None = None
        self.early: Background | None = None
        self.done = 0
        self.total = 0

    @property
    def scratch(self) -> str:
        """A local folder for the checker's scratch files."""
        return self.out.path

    @property
    def out(self) -> Staging:
        if self._out is None:
            folder = os.path.dirname(os.path.abspath(self.dst))
            self._out = Staging(folder, path=self.staging)
            self._out.create()
        return self._out

    def step(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def _create(self, name: str, what: str) -> int:
        try:
            return os.open(self.out.file(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise OutputError(f"cannot create {what}: {e.strerror}") from e

    def _open_data(self, data_name: str) -> int:
        if self.data_fd is None:
            self.data_fd = self._create(data_name, "the data file")
            self.data_name = data_name
        return self.data_fd

    def start_sidecar(
        self, data_name: str, payloads: list[Payload], *, align: int, checksum: bool
    ) -> None:
        fd = self._open_data(data_name)
        self.sidecar = SidecarWriter(payloads, fd, align=align, align_min=ALIGN_MIN,
                                     checksum=checksum, progress=self.step,
                                     writeback=self.fsync)
        self.total = self.sidecar.end
        self.sidecar.start()

    def start_prefix(self, name: str, prefix: Prefix) -> None:
        """Create the inline output and start writing *prefix* after its header."""
        self.model_fd = self._create(name, "the output")
        self.model_name = name
        self.prefix = prefix
        self.total = prefix.header_size + prefix.length
        self.early = Background(self.model_fd, prefix.pieces, start=prefix.header_size,
                                progress=self.step, writeback=self.fsync)
        self.early.start()

    def _stop_early(self) -> None:
        if self.early is not None:
            self.early.stop()
            self.early = None
        if self.model_fd is not None:
            os.close(self.model_fd)
            self.model_fd = None

    def discard_prefix(self) -> None:
        """Abandon the weights-first output (conversion changed what it starts with)."""
        self._stop_early()
        if self.model_name is not None:
            os.unlink(self.out.file(self.model_name))
            self.model_name = None
        self.prefix = None
        self.done = 0

    def write_weights_first(self, tail: Tail, name: str) -> int:
        """Finish the weights-first output: the rest, then the graph's length; publish."""
        assert self.prefix is not None and self.early is not None
        assert self.model_fd is not None and name == self.model_name
        prefix = self.prefix
        graph_length = prefix.length + tail.graph.length
        self.total = prefix.header_size + graph_length + tail.model.length
        self.early.finish()
        self.early = None
        try:
            write_pieces(self.model_fd, [*tail.graph.pieces, *tail.model.pieces], self.step,
                         writeback=self.fsync)
            header = prefix.header(graph_length)
            if os.pwrite(self.model_fd, header, 0) != len(header):
                raise OSError(0, "short write")
            self.step(len(header))
        except OSError as e:
            raise OutputError(f"writing the output failed: {e.strerror or e}") from e
        finally:
            os.close(self.model_fd)
            self.model_fd = None
        self._publish(name)
        return self.total

    def write_in_order(self, pieces: list[Any], name: str) -> int:
        """Write the model *pieces* in one pass, then publish; return bytes written."""
        self.total = sum(len(p) if isinstance(p, (bytes, bytearray)) else p.size
                         for p in pieces)
        fd = self._create(name, "the output")
        try:
            write_pieces(fd, pieces, self.step, writeback=self.fsync)
        except OSError as e:
            raise OutputError(f"writing the output failed: {e.strerror or e}") from e
        finally:
            os.close(fd)
        self._publish(name)
        return self.total

    def _publish(self, name: str, data: str | None = None) -> None:
        if self.before_publish is not None:
            self.before_publish(self.out.file(name))
        folder = self.out.folder
        superseded = previous_data_files(folder, name) if os.path.lexists(self.dst) else []
        publish(self.out, name, [data] if data else [], superseded=superseded,
                protect=self.protect, fsync=self.fsync, deferred=self.folder_syncs)

    def write(self, plan: OutputPlan, name: str) -> int:
        """Write *plan* into the temporary folder, then publish; return bytes written."""
        self.total = plan.model_size + plan.sidecar_size
        digests: dict[int, str] = {}
        if self.sidecar is not None:
            self.sidecar.finish()
            digests = self.sidecar.digests
        model_fd = self._create(name, "the output")
        try:
            data_fd = None
            if plan.has_data:
                assert plan.data_name is not None
                data_fd = self._open_data(plan.data_name)
            write_plan(plan, model_fd, data_fd, self.step, digests, writeback=self.fsync)
        finally:
            os.close(model_fd)
        if self.data_fd is not None:
            fd, self.data_fd = self.data_fd, None
            try:
                os.close(fd)
            except OSError as e:
                raise OutputError(f"writing the output failed: {e.strerror or e}") from e
        if plan.has_data:
            assert self.data_name is not None
            self._publish(name, self.data_name)
        else:
            self._publish(name)
        return self.total

    def close(self) -> None:
        """Stop any background copy and remove the temporary folder."""
        if self.sidecar is not None:
            self.sidecar.stop()
        self._stop_early()
        if self.data_fd is not None:
            os.close(self.data_fd)
            self.data_fd = None
        if self._out is not None:
            self._out.cleanup()


class _RemoteJob:
    """The output side of a conversion to a remote URL: uploads, completed together.

    Nothing is copied early: the plan is streamed once, in order, into the
    uploads (the data object first), completed only when every byte is written
    (see :class:`streamconv.storage.RemoteTarget`).
    """

    prefix: Prefix | None = None
    sidecar: SidecarWriter | None = None

    def __init__(self, dst: str, progress: ProgressCallback | None,
                 storage_options: dict[str, Any] | None) -> None:
        from .storage import RemoteTarget

        self.dst = dst
        self.progress = progress
        self.target = RemoteTarget(dst, storage_options)
        self.target.check_writable()
        self.protect: list[str] = []
        self._scratch: str | None = None
        self.done = 0
        self.total = 0

    @property
    def scratch(self) -> str:
        """A local folder for the checker's scratch files (removed by close)."""
        if self._scratch is None:
            import tempfile

            self._scratch = tempfile.mkdtemp(prefix="streamconv-")
        return self._scratch

    def step(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def write(self, plan: OutputPlan, name: str) -> int:
        """Upload *plan*: data object, then model; complete both; return bytes written."""
        self.total = plan.model_size + plan.sidecar_size
        stream_plan(plan, self.target.create, self.step)
        # as a local publish does: a data object that replaces one in place
        # first takes away the model that refers to it
        replace = plan.has_data and plan.data_name is not None and (
            self.target.exists(plan.data_name))
        self.target.commit(replace_model_first=replace)
        return self.total

    def write_in_order(self, pieces: list[Any], name: str) -> int:
        """Upload the model *pieces* in one pass and complete it; return bytes written."""
        self.total = sum(len(p) if isinstance(p, (bytes, bytearray)) else p.size
                         for p in pieces)
        try:
            stream_pieces(self.target.create(None, self.total), pieces, self.step)
        except OSError as e:
            raise OutputError(f"writing the output failed: {e.strerror or e}") from e
        self.target.commit(replace_model_first=False)
        return self.total

    def close(self) -> None:
        """Abort what was not completed; remove the scratch folder."""
        self.target.abort()
        if self._scratch is not None:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)


@dataclass
class Reach:
    """The ai.onnx opsets a model can be converted to, and what bounds them."""

    source: str
    opset: int
    lowest: int
    highest: int
    #: why the model cannot go below ``lowest`` (None when it reaches opset 1)
    below: str | None
    #: why the model cannot go above ``highest`` (None when it reaches the newest)
    above: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reachable(src: str | os.PathLike[str], *, strict_onnx: bool = False,
              size_threshold: int = DEFAULT_THRESHOLD,
              storage_options: dict[str, Any] | None = None) -> Reach:
    """The lowest and highest ai.onnx opset the model at *src* converts to.

    Works on the skeleton in memory (weights are never loaded) and writes
    nothing; the same conversion layer as :func:`convert` decides, so a
    conversion to any opset in the range succeeds (the output checker aside).
    Raises the errors :func:`convert` raises for bad input.
    """
    src = _local(os.fspath(src))
    _validate_options("auto", size_threshold, DEFAULT_ALIGN, None)
    with remote_scope(src), mapped_input(src, storage_options) as (buf, size):
        try:
            data, payloads = scan_payloads(buf, size, src, size_threshold)
            converter = _load_onnx()
            skeleton = analyze_skeleton(data, payloads, src)
            opset = converter.default_opset(skeleton.model)
            low, below, high, above = converter.reach(skeleton.model, strict_onnx=strict_onnx)
        except StreamconvError as e:
            raise e.with_file(src) from e.__cause__
    return Reach(src, opset, low, high, below, above)


def roundtrip(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, size_threshold: int = 0
) -> int:
    """Scan *src* and splice it back into *dst* with no conversion; return bytes written.

    The result is byte-for-byte the input (a self-check of scan and splice).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    _validate_options("inline", size_threshold, DEFAULT_ALIGN, None)
    _load_onnx()
    with mapped_input(src) as (buf, size):
        try:
            skeleton: Skeleton = build_skeleton(
                buf, size, src, size_threshold, for_conversion=False
            )
        except StreamconvError as e:
            raise e.with_file(src) from e.__cause__
        plan = plan_output(skeleton.data, skeleton.payloads, "inline", preserve=True)
        job = _Job(dst, None)
        try:
            return job.write(plan, os.path.basename(dst))
        finally:
            job.close()
