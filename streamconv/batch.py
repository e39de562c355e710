"""Batch conversion of a folder tree: ``python -m streamconv batch SRC DST --opset N``.

Every ``*.onnx`` below SRC lands at the same relative path below DST, converted
with :func:`streamconv.convert`, or copied through unchanged (with the
external-data files it references) when it already is at the target opset.

Each model is converted in a worker process of a small pool of our own: a
worker that crashes (a C++ abort, a segfault) or runs past the time limit is
killed and replaced, the model is reported as failed and the batch goes on.
Outputs go through the one publish of :mod:`streamconv.publish`, exactly as a
single conversion's do: staged beside their destination, moved into place
data first and model last, synced.  So an interrupted or killed worker never
leaves a half-written output, and the parent removes the staging folder of a
worker it killed or that died (its owner is gone: :func:`sweep_stale`).

Test hooks, honoured only inside worker processes: when the environment
variable ``STREAMCONV_BATCH_TEST_CRASH`` (``STREAMCONV_BATCH_TEST_HANG``) holds
a glob matching a model's relative source path, the worker calls
``os.abort()`` (sleeps far past any time limit) while that model's output is
half written.  They exist so tests can show crash and time-out isolation.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from multiprocessing.connection import Connection, wait
from typing import Any

import onnx

from .api import DEFAULT_ALIGN, DEFAULT_THRESHOLD, LAYOUTS, convert
from .converter import DEFAULT_DOMAINS, validate_target
from .errors import Interrupted, OutputError, StreamconvError, UsageError
from .publish import Staging, data_location, previous_data_files, publish, replace_file, sweep_stale
from .scan import map_file
from .skeleton import build_skeleton, iter_stub_tensors, stub_id
from .splice import INLINE_LIMIT

__all__ = [
    "REPORT_FIELDS",
    "STATUSES",
    "TEST_CRASH_ENV",
    "TEST_HANG_ENV",
    "VERIFY_TOLERANCE",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "ModelResult",
    "Parity",
    "check_folders",
    "convert_tree",
    "dry_run",
    "find_files",
    "summary_lines",
    "verify_parity",
    "write_report",
]

log = logging.getLogger(__name__)

CONVERTED = "converted"
AT_TARGET = "at_target"
FAILED = "failed"
SKIPPED = "skipped"
#: Per-model outcomes, in the order the summary lists them.
STATUSES = (CONVERTED, AT_TARGET, FAILED, SKIPPED)

TEST_CRASH_ENV = "STREAMCONV_BATCH_TEST_CRASH"
TEST_HANG_ENV = "STREAMCONV_BATCH_TEST_HANG"
_HANG_SECONDS = 3600.0

#: How often a worker reports progress on one model, at most.
_PROGRESS_INTERVAL = 0.1
#: A model file smaller than this is expected to convert quickly, so the next job is
#: sent to its worker ahead of time.
_PREFETCH_BELOW = 1 << 20
#: Workers that die before taking a job, in a row, before the batch gives up.
_MAX_START_FAILURES = 3
_JOIN_SECONDS = 5.0

#: Tolerances of --verify, per element type of an output (float16/bfloat16 are coarser).
VERIFY_TOLERANCE = {"default": (1e-3, 1e-5), "half": (1e-2, 1e-2)}

#: progress(event) — the library reports; the command line draws the bar.
ProgressCallback = Callable[["BatchProgress"], None]


# -- options and results ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs; see ``python -m streamconv batch --help`` for each option."""

    opset: int
    jobs: int = 1
    layout: str = "auto"
    size_threshold: int = DEFAULT_THRESHOLD
    align: int = DEFAULT_ALIGN
    check: bool = True
    force: bool = False
    force_convert: bool = False
    timeout: float | None = None
    verify: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    copy_other: bool = False
    strict_onnx: bool = False
    fsync: bool = True
    checksum: bool = False
    inline_functions: bool = False
    reuse_data: bool = False
    #: data-file name for each output, ``{name}`` (the model's file name) or ``{stem}``
    #: (without ``.onnx``) filled in; None: ``<model>.data``
    data_name: str | None = None

    def validate(self) -> None:
        """Raise UsageError naming the first invalid option."""
        validate_target(self.opset)
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.size_threshold, int) or self.size_threshold < 0:
            raise UsageError(f"--size-threshold must be >= 0, got {self.size_threshold}")
        align = self.align
        if not isinstance(align, int) or align < 1 or align & (align - 1) or align > 1 << 16:
            raise UsageError(f"--align must be a power of two from 1 to 65536, got {align}")
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {self.timeout:g}")
        for name, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for pattern in patterns:
                if not pattern:
                    raise UsageError(f"{name} needs a non-empty glob")
        if self.data_name is not None:
            if "{name}" not in self.data_name and "{stem}" not in self.data_name:
                # one fixed name would make every model of a folder share one data file
                raise UsageError(f"batch --data-name must contain {{name}} or {{stem}}, "
                                 f"got {self.data_name!r}")
            try:
                self.data_name.format(name="m.onnx", stem="m")
            except (KeyError, IndexError, ValueError) as e:
                raise UsageError(f"--data-name {self.data_name!r}: only {{name}} and "
                                 f"{{stem}} may be filled in ({e})") from e
        if self.verify and not _have_onnxruntime():
            raise UsageError("--verify needs onnxruntime (pip install onnxruntime)")


@dataclass
class ModelResult:
    """What the batch did with one model; paths are relative POSIX paths."""

    source: str
    destination: str
    #: one of STATUSES
    status: str
    #: what was (or would be) done: "convert", "copy" or "skip"
    action: str
    opset_from: int | None = None
    opset_to: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    tensors_diverted: int | None = None
    seconds: float = 0.0
    error: str | None = None
    #: outcome of --verify, None when not asked for
    verify: str | None = None
    #: external-data files written beside the output, relative to DST
    data_files: list[str] = field(default_factory=list)
    #: what the conversion warned about (the input already failing the checker, ...)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BatchProgress:
    """Where a running batch stands; *result* is set when a model has just finished."""

    models_done: int
    models_total: int
    bytes_done: int
    bytes_total: int
    result: ModelResult | None = None


@dataclass
class BatchResult:
    """Everything a batch did."""

    source_dir: str
    destination_dir: str
    options: BatchOptions
    models: list[ModelResult] = field(default_factory=list)
    others_copied: list[str] = field(default_factory=list)
    others_up_to_date: list[str] = field(default_factory=list)
    others_failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: signal number (or 2 for Ctrl-C) when the batch was interrupted
    interrupted: int | None = None

    def counts(self) -> dict[str, int]:
        """Models per status, every status present."""
        counts = dict.fromkeys(STATUSES, 0)
        for m in self.models:
            counts[m.status] += 1
        return counts

    @property
    def failed(self) -> bool:
        return any(m.status == FAILED for m in self.models) or bool(self.others_failed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_dir": self.source_dir,
            "destination_dir": self.destination_dir,
            "opset": self.options.opset,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted is not None,
            "counts": self.counts(),
            "models": [m.to_dict() for m in self.models],
            "other_files": {
                "copied": self.others_copied,
                "up_to_date": self.others_up_to_date,
                "failed": [{"path": p, "error": e} for p, e in self.others_failed],
            },
        }


def _have_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _one_line(error: BaseException) -> str:
    """The error as one line, without the file name the report already shows."""
    if isinstance(error, StreamconvError):
        error.file = None  # the staging path or the source path; the report names the model
        text = str(error)
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


# -- finding the work ------------------------------------------------------------------------


def _matches(rel: str, pattern: str) -> bool:
    """Glob match on the whole relative path, or, for a pattern without '/', on any part."""
    if fnmatch.fnmatchcase(rel, pattern):
        return True
    return "/" not in pattern and any(fnmatch.fnmatchcase(p, pattern) for p in rel.split("/"))


def _selected(rel: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(_matches(rel, p) for p in include):
        return False
    return not any(_matches(rel, p) for p in exclude)


def find_files(
    src_dir: str, dst_dir: str, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """``(models, others)``: relative POSIX paths below *src_dir*, sorted, filtered.

    *dst_dir* is left out of the walk when it lies inside *src_dir*, and so are
    streamconv's own temporary folders.  Symbolic links to folders are not
    followed.
    """
    real_dst = os.path.realpath(dst_dir)
    models: list[str] = []
    others: list[str] = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".streamconv-")
            and os.path.realpath(os.path.join(root, d)) != real_dst
        )
        rel_root = os.path.relpath(root, src_dir)
        for name in sorted(files):
            if name.startswith(".streamconv-"):
                continue
            rel = name if rel_root == "." else f"{rel_root}/{name}".replace(os.sep, "/")
            if not _selected(rel, include, exclude):
                continue
            (models if name.endswith(".onnx") else others).append(rel)
    return models, others


def check_folders(src_dir: str, dst_dir: str) -> None:
    if not os.path.isdir(src_dir):
        raise UsageError(f"SRC_DIR {src_dir} is not a folder")
    if os.path.exists(dst_dir) and not os.path.isdir(dst_dir):
        raise UsageError(f"DST_DIR {dst_dir} exists and is not a folder")
    real_src, real_dst = os.path.realpath(src_dir), os.path.realpath(dst_dir)
    if real_src == real_dst:
        raise UsageError("SRC_DIR and DST_DIR are the same folder; outputs would replace inputs")
    if os.path.commonpath([real_src, real_dst]) == real_dst:
        raise UsageError(f"SRC_DIR {src_dir} lies inside DST_DIR {dst_dir}; "
                         "outputs could replace inputs")


def _data_location(tensor: onnx.TensorProto) -> str | None:
    """The normalized relative location of an external tensor, or None if unusable."""
    return data_location(next((e.value for e in tensor.external_data if e.key == "location"), ""))


@dataclass
class _Probe:
    """What a quick look at a model file tells: its ai.onnx opset and its data files."""

    opset: int | None
    #: usable external-data locations, normalized, each once
    data_files: list[str]
    #: tensors stored as external data, usable location or not
    external_tensors: int
    model: onnx.ModelProto


def _probe(path: str, threshold: int) -> _Probe:
    """Scan *path* into a skeleton (payloads stay on disk).

    External-data locations are listed as written (normalized); they are not
    checked here.  Raises StreamconvError for a file that is not a model.
    """
    fd = os.open(path, os.O_RDONLY)
    buf: Any = None
    try:
        size = os.fstat(fd).st_size
        buf = map_file(fd, size)
        skeleton = build_skeleton(buf, size, path, threshold, for_conversion=False)
    finally:
        if buf is not None and hasattr(buf, "close"):
            buf.close()
        os.close(fd)
    model = skeleton.model
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    data_files: list[str] = []
    external = 0
    for tensor, _, _ in iter_stub_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or stub_id(tensor) is not None:
            continue
        external += 1
        location = _data_location(tensor)
        if location is not None and location not in data_files:
            data_files.append(location)
    return _Probe(max(versions) if versions else None, data_files, external, model)


def _up_to_date(src: str, dst: str, threshold: int) -> list[str] | None:
    """The output's data files (relative to its folder) if *dst* is up to date, else None.

    Up to date: *dst* is at least as new as *src* and every external-data file
    it references exists.
    """
    try:
        if os.stat(dst).st_mtime_ns < os.stat(src).st_mtime_ns:
            return None
        data_files = _probe(dst, threshold).data_files
    except (OSError, StreamconvError):
        return None
    folder = os.path.dirname(dst)
    if all(os.path.isfile(os.path.join(folder, *f.split("/"))) for f in data_files):
        return data_files
    return None


# -- the worker side -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    index: int
    rel: str
    src: str
    dst: str
    size: int


class _TestHook:
    """The crash/hang test hook of the module docstring, for one model."""

    def __init__(self, rel: str) -> None:
        crash, hang = os.environ.get(TEST_CRASH_ENV), os.environ.get(TEST_HANG_ENV)
        self.action = (
            "crash" if crash and _matches(rel, crash)
            else "hang" if hang and _matches(rel, hang)
            else None
        )

    def fire(self) -> None:
        action, self.action = self.action, None
        if action == "crash":
            with contextlib.suppress(ImportError, ValueError, OSError):
                import resource

                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a test leaves no core file
            os.abort()
        elif action == "hang":
            time.sleep(_HANG_SECONDS)


def _copy_through(job: _Job, probe: _Probe, options: BatchOptions,
                  hook: _TestHook, progress: Callable[[int], None]) -> tuple[int, list[str]]:
    """Copy the model and its external-data files unchanged; return (bytes, data files).

    Raises ExternalDataError, exactly as convert() would, for references that
    are missing, short or outside the model's folder.
    """
    if probe.external_tensors:
        # The same checks convert() makes, so a bad reference fails the same way.
        fd = os.open(job.src, os.O_RDONLY)
        buf: Any = None
        try:
            size = os.fstat(fd).st_size
            buf = map_file(fd, size)
            build_skeleton(buf, size, job.src, options.size_threshold, for_conversion=True)
        finally:
            if buf is not None and hasattr(buf, "close"):
                buf.close()
            os.close(fd)
    src_dir = os.path.dirname(job.src)
    name = os.path.basename(job.dst)
    sources = {rel: os.path.join(src_dir, *rel.split("/")) for rel in probe.data_files}
    sources[name] = job.src
    total = sum(os.path.getsize(p) for p in sources.values()) or 1
    copied = 0
    folder = os.path.dirname(job.dst)
    staging = Staging(folder)
    staging.create()
    try:
        for rel, source in sources.items():
            target = staging.file(rel)
            shutil.copyfile(source, target)
            copied += os.path.getsize(target)
            progress(job.size * copied // total)  # the bar counts model-file bytes
            hook.fire()
        superseded = previous_data_files(folder, name) if os.path.lexists(job.dst) else []
        publish(staging, name, probe.data_files, superseded=superseded,
                protect=list(sources.values()), fsync=options.fsync)
    finally:
        staging.cleanup()
    return copied, probe.data_files


def _run_job(job: _Job, options: BatchOptions,
             send_progress: Callable[[int], None]) -> ModelResult:
    """Convert or copy one model into place; never raises for a model."""
    started = time.perf_counter()
    result = ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                         opset_to=options.opset, bytes_in=job.size)
    hook = _TestHook(job.rel)
    try:
        os.makedirs(os.path.dirname(job.dst), exist_ok=True)
        try:
            probe: _Probe | None = _probe(job.src, options.size_threshold)
        except (StreamconvError, OSError):
            probe = None  # convert() names the problem the way a single conversion does
        if probe is not None:
            result.opset_from = probe.opset
            result.bytes_in = job.size + sum(
                _size_or_zero(os.path.join(os.path.dirname(job.src), *f.split("/")))
                for f in probe.data_files
            )
        if probe is not None and probe.opset == options.opset and not options.force_convert:
            result.action = "copy"
            result.bytes_out, result.data_files = _copy_through(
                job, probe, options, hook, send_progress
            )
            result.tensors_diverted = 0
            result.status = AT_TARGET
            if options.verify:
                result.verify = "not run: copied unchanged"
        else:
            _convert_one(job, probe, options, hook, send_progress, result)
    except Exception as e:  # one model's failure, whatever it is, must not stop the batch
        result.status = FAILED
        result.error = _one_line(e)
        log.debug("%s failed", job.rel, exc_info=True)
    finally:
        result.seconds = round(time.perf_counter() - started, 4)
    return result


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _convert_one(job: _Job, probe: _Probe | None, options: BatchOptions,
                 hook: _TestHook, send_progress: Callable[[int], None],
                 result: ModelResult) -> None:
    """Convert *job* into place, verifying the staged result first if asked."""
    layout = options.layout
    if layout == "auto" and probe is not None and probe.data_files:
        layout = "external"  # a model that kept its weights apart keeps them apart

    def progress(done: int, total: int) -> None:
        send_progress(job.size * done // total if total else job.size)
        hook.fire()

    def before_publish(staged: str) -> None:
        hook.fire()
        if options.verify:
            parity = verify_parity(job.src, staged)
            result.verify = parity.detail.replace(staged, job.dst)  # name the model
            if parity.ok is False:
                raise StreamconvError(f"--verify: {result.verify}")

    data_name = None
    if options.data_name is not None:
        name = os.path.basename(job.dst)
        data_name = options.data_name.format(name=name, stem=name.removesuffix(".onnx"))
    report = convert(
        job.src, job.dst, opset=options.opset, layout=layout,
        size_threshold=options.size_threshold, align=options.align, check=options.check,
        checksum=options.checksum, inline_functions=options.inline_functions,
        reuse_data=options.reuse_data, data_name=data_name,
        strict_onnx=options.strict_onnx, fsync=options.fsync, progress=progress,
        before_publish=before_publish,
    )
    result.warnings = list(report.warnings)
    data_files = [os.path.relpath(report.data_file, os.path.dirname(job.dst)).replace(
        os.sep, "/")] if report.data_file else []
    result.opset_from = report.opset_from
    result.tensors_diverted = report.tensors_diverted
    result.bytes_out = report.bytes_out
    result.data_files = data_files
    result.status = AT_TARGET if report.opset_from == options.opset else CONVERTED


#: What a worker runs: ``python -c _WORKER_BOOT <socket fd> <sys.path>``.
#: It takes the parent's import path, so it imports this very copy of streamconv.
_WORKER_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from streamconv.batch import _worker_main; _worker_main(int(sys.argv[1]))"
)


def _worker_main(fd: int) -> None:
    """Body of a worker process: options, then jobs, from the socket *fd* until None or EOF.

    The parent started us with stdout on /dev/null and stderr on a log file it
    reads when we die, in a session of our own so that a Ctrl-C at the terminal
    reaches only the parent, which decides what happens to us.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    conn = Connection(fd)
    try:
        options = conn.recv()
    except (EOFError, OSError):
        return
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(2, 0)  # the log holds what this job wrote, nothing older
        last = time.monotonic()  # a model done within the interval sends no progress at all

        def send_progress(done: int, index: int = job.index) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= _PROGRESS_INTERVAL:
                last = now
                conn.send(("progress", index, done))

        conn.send(("done", job.index, _run_job(job, options, send_progress)))


# -- --verify --------------------------------------------------------------------------------


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

    model = _probe(original, DEFAULT_THRESHOLD).model
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


# -- the pool --------------------------------------------------------------------------------


class _Slot:
    """One worker process and the job it is on."""

    def __init__(self, options: BatchOptions, log_path: str) -> None:
        self.log_path = log_path
        ours, theirs = socket.socketpair()
        try:
            with open(log_path, "ab") as log:
                # A plain subprocess rather than multiprocessing: it imports only streamconv,
                # never the caller's __main__, and works whatever that main module is.
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_BOOT, str(theirs.fileno()),
                     json.dumps(sys.path)],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                )
        except OSError as e:
            ours.close()
            raise StreamconvError(f"cannot start a worker process: {e.strerror}") from e
        finally:
            theirs.close()  # so that our end reads EOF when the worker dies
        self.conn = Connection(ours.detach())
        self.conn.send(options)
        self.ready = False
        self.dead = False
        #: jobs sent and not yet done: the first is running, the others wait in the socket
        self.jobs: deque[_Job] = deque()
        #: when the running job started (as far as the parent can tell)
        self.started = 0.0
        #: model-file bytes of the running job done so far
        self.partial = 0

    @property
    def job(self) -> _Job | None:
        """The job the worker is on, if any."""
        return self.jobs[0] if self.jobs else None

    def give(self, job: _Job) -> bool:
        try:
            self.conn.send(job)
        except OSError:
            self.dead = True
            return False
        if not self.jobs:
            self.started, self.partial = time.monotonic(), 0
        self.jobs.append(job)
        return True

    def finish(self) -> None:
        """The running job is done; the next one sent, if any, runs from now."""
        self.jobs.popleft()
        self.started, self.partial = time.monotonic(), 0

    def messages(self) -> Iterator[tuple[Any, ...]]:
        try:
            while not self.dead and self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError):
            self.dead = True

    def gone(self) -> bool:
        return self.dead or self.proc.poll() is not None

    def join(self, seconds: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(seconds)

    def kill(self) -> None:
        """End the process and remove the staging folder of its running job, if any."""
        alive = self.proc.poll() is None
        try:
            # the worker leads its own process group: this also ends a copy
            # process it forked, even when the worker itself already died
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (OSError, AttributeError):
            if alive:
                self.proc.kill()
        self.join(_JOIN_SECONDS)
        self.conn.close()
        if self.job is not None and self.proc.poll() is not None:
            # the owner is gone now, so its staging folder counts as stale
            sweep_stale(os.path.dirname(self.job.dst))

    def death(self) -> str:
        """Why the process ended, with the last line it wrote to stderr if any."""
        self.join(_JOIN_SECONDS)
        code = self.proc.returncode
        if code is not None and code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                lines = [line.strip() for line in f.read()[-4000:].splitlines() if line.strip()]
        except OSError:
            lines = []
        return how + (f"; last message: {lines[-1][:200]}" if lines else "")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Let cleanup finish even if Ctrl-C is pressed again."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: nothing to hold
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Pool:
    """Worker processes that survive crashes and time-outs of the models they convert."""

    def __init__(self, options: BatchOptions, dst_dir: str, workdir: str,
                 on_result: Callable[[ModelResult, int], None],
                 on_progress: Callable[[int], None]) -> None:
        self.options = options
        self.dst_dir = dst_dir
        self.workdir = workdir
        self.on_result = on_result
        self.on_progress = on_progress
        self.started = 0
        self.start_failures = 0
        self.slots: list[_Slot] = []

    def _start(self) -> _Slot:
        self.started += 1
        log_path = os.path.join(self.workdir, f"worker-{self.started}.log")
        return _Slot(self.options, log_path)

    def _lost(self, slot: _Slot, reason: str, pending: deque[_Job]) -> None:
        """Report the running job of a dead or killed worker as failed.

        Jobs sent to it that had not started go back to the front of *pending*.
        """
        job = slot.job
        if job is None:
            return
        slot.jobs.popleft()
        pending.extendleft(reversed(slot.jobs))
        slot.jobs.clear()
        self.on_result(ModelResult(
            source=job.rel, destination=job.rel, status=FAILED, action="convert",
            opset_to=self.options.opset, bytes_in=job.size,
            seconds=round(time.monotonic() - slot.started, 4), error=reason,
        ), self._partial_bytes())

    def run(self, jobs: Sequence[_Job]) -> None:
        """Run every job; results arrive through on_result.  Cleans up on any exit."""
        # Largest first, so a huge model starts early and runs beside the small ones.
        pending = deque(sorted(jobs, key=lambda j: (-j.size, j.index)))
        self.slots = [self._start() for _ in range(min(self.options.jobs, len(pending)))]
        retired: list[_Slot] = []
        try:
            while pending or any(s.job is not None for s in self.slots):
                self._wait()
                for slot in list(self.slots):
                    for message in slot.messages():
                        self._handle(slot, message)
                    if slot.gone():
                        if slot.job is None and not slot.ready:
                            self.start_failures += 1
                            if self.start_failures >= _MAX_START_FAILURES:
                                raise StreamconvError(
                                    f"worker processes die on start-up ({slot.death()})"
                                )
                        slot.kill()
                        self._lost(slot, f"the converter process died ({slot.death()})", pending)
                        self._replace(slot, pending)
                    elif slot.job is not None and self._overdue(slot):
                        slot.kill()
                        self._lost(slot, f"timed out after {self.options.timeout:g} s", pending)
                        self._replace(slot, pending)
                for slot in self.slots:
                    while slot.ready and pending and len(slot.jobs) < self._depth(slot):
                        job = pending.popleft()
                        if not slot.give(job):
                            pending.appendleft(job)
                            break
                if not pending:  # nothing left to hand out: let idle workers go
                    for slot in [s for s in self.slots if s.job is None]:
                        self.slots.remove(slot)
                        retired.append(slot)
                        with contextlib.suppress(OSError):
                            slot.conn.send(None)
        finally:
            with _signals_held():
                self._shutdown(self.slots + retired)

    @staticmethod
    def _depth(slot: _Slot) -> int:
        """How many jobs a worker may hold: one more behind a small running job.

        The extra job waits in the worker's socket, so the worker goes on without
        waiting for us; behind a large model it would wait, so none is queued there.
        """
        running = slot.job
        return 2 if running is not None and running.size < _PREFETCH_BELOW else 1

    def _replace(self, slot: _Slot, pending: Sequence[_Job]) -> None:
        """Swap a dead worker for a fresh one, if there is still work for it."""
        self.slots.remove(slot)
        if pending:
            self.slots.append(self._start())

    def _overdue(self, slot: _Slot) -> bool:
        timeout = self.options.timeout
        return timeout is not None and time.monotonic() - slot.started > timeout

    def _wait(self) -> None:
        timeout = None
        if self.options.timeout is not None:
            ends = [s.started + self.options.timeout for s in self.slots if s.job is not None]
            if ends:
                timeout = max(0.0, min(ends) - time.monotonic()) + 0.01
        # A worker's socket turns readable on each message and at EOF when it dies.
        handles = [s.conn for s in self.slots if not s.dead]
        if handles:
            wait(handles, timeout)

    def _handle(self, slot: _Slot, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            slot.ready = True
            self.start_failures = 0
        elif kind == "progress" and slot.job is not None and message[1] == slot.job.index:
            slot.partial = int(message[2])
            self.on_progress(self._partial_bytes())
        elif kind == "done" and slot.job is not None and message[1] == slot.job.index:
            slot.finish()
            self.on_result(message[2], self._partial_bytes())

    def _partial_bytes(self) -> int:
        return sum(s.partial for s in self.slots if s.job is not None)

    def _shutdown(self, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            if slot.job is not None or not slot.ready:
                slot.kill()  # interrupted mid-job: the parent, not the worker, cleans up
            else:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        for slot in slots:
            slot.join(_JOIN_SECONDS)
            slot.kill()


# -- the batch -------------------------------------------------------------------------------


def _copy_others(src_dir: str, dst_dir: str, others: Sequence[str], produced: set[str],
                 options: BatchOptions, result: BatchResult) -> None:
    """Copy the files that are neither models nor their data, atomically, if out of date."""
    for rel in others:
        if rel in produced:
            log.warning("not copying %s: a converted model's output has that name", rel)
            continue
        src = os.path.join(src_dir, *rel.split("/"))
        dst = os.path.join(dst_dir, *rel.split("/"))
        try:
            if not options.force and os.path.exists(dst) and \
                    os.stat(dst).st_mtime_ns >= os.stat(src).st_mtime_ns:
                result.others_up_to_date.append(rel)
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            staging = Staging(os.path.dirname(dst))
            staging.create()
            try:
                name = os.path.basename(dst)
                shutil.copyfile(src, staging.file(name))
                publish(staging, name, fsync=options.fsync)
            finally:
                staging.cleanup()
            result.others_copied.append(rel)
        except (OSError, StreamconvError) as e:
            result.others_failed.append((rel, _one_line(e)))


def _referenced_data(src_dir: str, models: Sequence[str], threshold: int) -> set[str]:
    """Every file below *src_dir* that a model references as external data."""
    referenced: set[str] = set()
    for rel in models:
        folder = os.path.dirname(rel)
        try:
            probe = _probe(os.path.join(src_dir, *rel.split("/")), threshold)
        except (StreamconvError, OSError):
            continue
        referenced.update(_posix_join(folder, f) for f in probe.data_files)
    return referenced


def _plan(src_dir: str, dst_dir: str, options: BatchOptions,
          result: BatchResult) -> tuple[list[_Job], list[str], set[str]]:
    """Find the work: jobs to run, other files to copy, and paths the outputs occupy.

    Models whose output is up to date go straight into *result* as skipped.
    """
    models, others = find_files(src_dir, dst_dir, options.include, options.exclude)
    jobs: list[_Job] = []
    produced: set[str] = set()
    for index, rel in enumerate(models):
        src = os.path.join(src_dir, *rel.split("/"))
        dst = os.path.join(dst_dir, *rel.split("/"))
        produced.add(rel)
        fresh = None if options.force else _up_to_date(src, dst, options.size_threshold)
        if fresh is not None:
            data = [_posix_join(os.path.dirname(rel), f) for f in fresh]
            produced.update(data)
            result.models.append(ModelResult(
                source=rel, destination=rel, status=SKIPPED, action="skip",
                opset_to=options.opset, bytes_in=_size_or_zero(src),
                bytes_out=_size_or_zero(dst), data_files=data,
            ))
            continue
        jobs.append(_Job(index, rel, src, dst, _size_or_zero(src)))
    if options.copy_other:
        referenced = _referenced_data(src_dir, models, options.size_threshold)
        others = [o for o in others if o not in referenced]
    else:
        others = []
    return jobs, others, produced


def _posix_join(folder: str, name: str) -> str:
    """*name* (relative POSIX) inside relative POSIX *folder*, normalized."""
    return os.path.normpath(os.path.join(folder, name)).replace(os.sep, "/")


def convert_tree(
    src_dir: str | os.PathLike[str],
    dst_dir: str | os.PathLike[str],
    options: BatchOptions,
    *,
    progress: ProgressCallback | None = None,
) -> BatchResult:
    """Convert every ``*.onnx`` below *src_dir* into the same place below *dst_dir*.

    Runs ``options.jobs`` worker processes.  A model that fails, crashes its
    worker or times out is reported as failed; the rest go on.  On Ctrl-C
    (KeyboardInterrupt) the workers are stopped, no half-written output is
    left, and the result so far is returned with ``interrupted`` set.
    *progress* is called from this thread whenever a model advances or ends.

    Raises UsageError for bad options or folders, OutputError when DST cannot
    be written, StreamconvError when worker processes cannot start.
    """
    started = time.perf_counter()
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    if os.name != "posix":
        raise UsageError("batch conversion needs a POSIX system (its workers share a socket)")
    options.validate()
    check_folders(src_dir, dst_dir)
    result = BatchResult(src_dir, dst_dir, options)
    workdir = None
    try:
        jobs, others, produced = _plan(src_dir, dst_dir, options, result)
        try:
            os.makedirs(dst_dir, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create DST_DIR {dst_dir}: {e.strerror}") from e
        sweep_stale(dst_dir)
        sizes = {j.rel: j.size for j in jobs}
        total = sum(sizes.values())
        finished = {"models": 0, "bytes": 0}

        def on_progress(partial: int, model: ModelResult | None = None) -> None:
            if progress is not None:
                progress(BatchProgress(finished["models"], len(jobs),
                                       finished["bytes"] + partial, total, model))

        def on_result(model: ModelResult, partial: int) -> None:
            result.models.append(model)
            finished["models"] += 1
            finished["bytes"] += sizes.get(model.source, 0)
            produced.update(_posix_join(os.path.dirname(model.source), f)
                            for f in model.data_files)
            log.debug("%s: %s %s", model.source, model.status, model.error or "")
            on_progress(partial, model)

        on_progress(0)
        if jobs:
            workdir = tempfile.mkdtemp(prefix="streamconv-batch-")
            pool = _Pool(options, dst_dir, workdir, on_result, on_progress)
            pool.run(jobs)
        if others:
            _copy_others(src_dir, dst_dir, others, produced, options, result)
    except Interrupted as e:
        result.interrupted = int(e.args[0]) if e.args else signal.SIGINT
    except KeyboardInterrupt:
        result.interrupted = int(signal.SIGINT)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        result.models.sort(key=lambda m: m.source)
        result.seconds = time.perf_counter() - started
    return result


def dry_run(src_dir: str, dst_dir: str, options: BatchOptions) -> list[tuple[str, str, str]]:
    """What a batch would do, without writing anything: ``(action, path, detail)`` rows.

    Raises UsageError for bad options or folders.
    """
    options.validate()
    check_folders(src_dir, dst_dir)
    result = BatchResult(src_dir, dst_dir, options)
    jobs, others, _ = _plan(src_dir, dst_dir, options, result)
    rows = [("skip", m.source, "up to date") for m in result.models]
    for job in jobs:
        try:
            probe = _probe(job.src, options.size_threshold)
        except (StreamconvError, OSError) as e:
            rows.append(("convert", job.rel, f"unreadable, will fail: {_one_line(e)}"))
            continue
        data = f" + {len(probe.data_files)} data file(s)" if probe.data_files else ""
        if probe.opset is None:
            rows.append(("convert", job.rel, "imports no ai.onnx opset, will fail"))
        elif probe.opset == options.opset and not options.force_convert:
            rows.append(("copy", job.rel, f"already at opset {probe.opset}{data}"))
        else:
            rows.append(("convert", job.rel, f"opset {probe.opset} -> {options.opset}{data}"))
    rows += [("copy-other", rel, "") for rel in others]
    return sorted(rows, key=lambda r: (r[0] == "copy-other", r[1]))


# -- reports ---------------------------------------------------------------------------------

REPORT_FIELDS = tuple(f.name for f in fields(ModelResult))


def write_report(path: str | os.PathLike[str], result: BatchResult) -> None:
    """Write *result* as JSON, or as CSV (one row per model) when *path* ends in ``.csv``.

    The file appears atomically.  Raises OSError when it cannot be written.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".streamconv-report-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if path.lower().endswith(".csv"):
                writer = csv.DictWriter(f, fieldnames=REPORT_FIELDS)
                writer.writeheader()
                for m in result.models:
                    row = m.to_dict()
                    row["data_files"] = " ".join(m.data_files)
                    writer.writerow({k: "" if v is None else v for k, v in row.items()})
            else:
                json.dump(result.to_dict(), f, indent=1)
                f.write("\n")
        replace_file(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def summary_lines(result: BatchResult) -> list[str]:
    """The table the command line prints at the end of a batch."""
    counts = result.counts()
    copied = sum(1 for m in result.models if m.status == AT_TARGET and m.action == "copy")
    verified = [m for m in result.models if m.verify is not None]
    lines = [
        f"{len(result.models)} models, {result.source_dir} -> {result.destination_dir}, "
        f"opset {result.options.opset}, {result.options.jobs} jobs, {result.seconds:.1f} s"
        + (" (interrupted)" if result.interrupted is not None else ""),
        f"  {'converted':<20}{counts[CONVERTED]:>7}",
        f"  {'already at target':<20}{counts[AT_TARGET]:>7}  "
        f"({copied} copied through, {counts[AT_TARGET] - copied} converted)",
        f"  {'failed':<20}{counts[FAILED]:>7}",
        f"  {'skipped':<20}{counts[SKIPPED]:>7}  (up to date)",
    ]
    if verified:
        matched = sum(1 for m in verified if m.verify and m.verify.startswith("match"))
        mismatched = sum(1 for m in verified if m.error and m.error.startswith("--verify"))
        lines.append(f"  {'verified':<20}{matched:>7}  match ({mismatched} mismatched, "
                     f"{len(verified) - matched - mismatched} not checked)")
    if result.options.copy_other:
        lines.append(f"  {'other files copied':<20}{len(result.others_copied):>7}  "
                     f"({len(result.others_up_to_date)} up to date, "
                     f"{len(result.others_failed)} failed)")
    failed = [m for m in result.models if m.status == FAILED]
    if failed or result.others_failed:
        lines.append("failed:")
        lines += [f"  {m.source}: {m.error}" for m in failed]
        lines += [f"  {rel}: {error}" for rel, error in result.others_failed]
    return lines
