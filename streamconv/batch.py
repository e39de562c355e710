"""Batch conversion of a folder tree: ``python -m streamconv batch SRC DST --opset N``.

Every ``*.onnx`` below SRC lands at the same relative path below DST, converted
with :func:`streamconv.convert`, or copied through unchanged (with the
external-data files it references) when it already is at the target opset.

Each model is converted in a worker process of a small pool of our own: a
worker that crashes (a C++ abort, a segfault) or runs past the time limit is
killed and replaced, the model is reported as failed and the batch goes on.
Workers write into a private staging folder beside the output
(``.streamconv-batch-<pid>-<n>``) and publish by rename, so an interrupted or
killed worker never leaves a half-written output; the staging folder of a
killed worker is removed by the parent.

Test hooks, honoured only inside worker processes: when the environment
variable ``STREAMCONV_BATCH_TEST_CRASH`` (``STREAMCONV_BATCH_TEST_HANG``) holds
a glob matching a model's relative source path, the worker calls
``os.abort()`` (sleeps far past any time limit) while that model's output is
half written.  They exist so tests can show crash and time-out isolation.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fnmatch
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
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
from .convert import DEFAULT_DOMAINS, max_opset, validate_target
from .errors import StreamconvError, UsageError
from .scan import map_file
from .skeleton import build_skeleton, iter_stub_tensors, stub_id
from .splice import INLINE_LIMIT

__all__ = [
    "STATUSES",
    "TEST_CRASH_ENV",
    "TEST_HANG_ENV",
    "BatchOptions",
    "BatchProgress",
    "BatchResult",
    "ModelResult",
    "Parity",
    "convert_tree",
    "find_files",
    "run_batch",
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

STAGING_PREFIX = ".streamconv-batch-"
_STAGING_RE = re.compile(r"^\.streamconv-batch-(\d+)-o?\d+$")
#: How often a worker reports progress on one model, at most.
_PROGRESS_INTERVAL = 0.1
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


class _Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; carries the signal number."""


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
    models, others = [], []
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


def _check_folders(src_dir: str, dst_dir: str) -> None:
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
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    if not location or "\0" in location or location.startswith(("/", "\\")):
        return None
    if len(location) > 1 and location[1] == ":":
        return None
    norm = os.path.normpath(location.replace("\\", "/")).replace(os.sep, "/")
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return norm


@dataclass
class _Probe:
    """What a quick look at a model file tells: its ai.onnx opset and its data files."""

    opset: int | None
    data_files: list[str]
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
    for tensor, _, _ in iter_stub_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or stub_id(tensor) is not None:
            continue
        location = _data_location(tensor)
        if location is not None and location not in data_files:
            data_files.append(location)
    return _Probe(max(versions) if versions else None, data_files, model)


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


def _sweep_stale_staging(folders: Sequence[str]) -> None:
    """Remove staging folders left by batches whose process is gone (killed outright)."""
    if os.name != "posix":
        return
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            match = _STAGING_RE.match(name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(match.group(1)), 0)
                continue  # that batch still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            log.info("removing %s, left by an earlier batch", os.path.join(folder, name))
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# -- the worker side -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    index: int
    rel: str
    src: str
    dst: str
    staging: str
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
            os.abort()
        elif action == "hang":
            time.sleep(_HANG_SECONDS)


def _publish(staging: str, final_dir: str, names: Sequence[str]) -> None:
    """Move *names* (relative POSIX paths) from *staging* into *final_dir*, in order."""
    for name in names:
        parts = name.split("/")
        target = os.path.join(final_dir, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(staging, *parts), target)


def _copy_through(job: _Job, probe: _Probe, options: BatchOptions, hook: _TestHook,
                  progress: Callable[[int], None]) -> tuple[int, list[str]]:
    """Copy the model and its external-data files unchanged; return (bytes, data files).

    Raises ExternalDataError, exactly as convert() would, for references that
    are missing, short or outside the model's folder.
    """
    if probe.data_files:
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
    copied = 0
    for rel in [*probe.data_files, name]:
        parts = rel.split("/")
        source = job.src if rel == name else os.path.join(src_dir, *parts)
        target = os.path.join(job.staging, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(source, target)
        copied += os.path.getsize(target)
        progress(copied)
        hook.fire()
    _publish(job.staging, os.path.dirname(job.dst), [*probe.data_files, name])
    return copied, probe.data_files


def _run_job(job: _Job, options: BatchOptions, send_progress: Callable[[int], None]) -> ModelResult:
    """Convert or copy one model into place; never raises for a model that fails."""
    started = time.perf_counter()
    result = ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                         opset_to=options.opset, bytes_in=job.size)
    hook = _TestHook(job.rel)
    try:
        os.makedirs(os.path.dirname(job.dst), exist_ok=True)
        shutil.rmtree(job.staging, ignore_errors=True)
        os.mkdir(job.staging)
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
        shutil.rmtree(job.staging, ignore_errors=True)
        result.seconds = round(time.perf_counter() - started, 4)
    return result


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _convert_one(job: _Job, probe: _Probe | None, options: BatchOptions, hook: _TestHook,
                 send_progress: Callable[[int], None], result: ModelResult) -> None:
    """Convert *job* into its staging folder, verify it if asked, then publish it."""
    layout = options.layout
    if layout == "auto" and probe is not None and probe.data_files:
        layout = "external"  # a model that kept its weights apart keeps them apart

    def progress(done: int, total: int) -> None:
        send_progress(job.size * done // total if total else job.size)
        hook.fire()

    name = os.path.basename(job.dst)
    staged = os.path.join(job.staging, name)
    report = convert(
        job.src, staged, opset=options.opset, layout=layout,
        size_threshold=options.size_threshold, align=options.align, check=options.check,
        progress=progress,
    )
    hook.fire()
    data_files = [os.path.relpath(report.data_file, job.staging).replace(os.sep, "/")] \
        if report.data_file else []
    result.opset_from = report.opset_from
    result.tensors_diverted = report.tensors_diverted
    result.bytes_out = report.bytes_out
    result.data_files = data_files
    if options.verify:
        parity = verify_parity(job.src, staged)
        result.verify = parity.detail
        if parity.ok is False:
            raise StreamconvError(f"--verify: {parity.detail}")
    _publish(job.staging, os.path.dirname(job.dst), [*data_files, name])
    result.status = AT_TARGET if report.opset_from == options.opset else CONVERTED


def _worker_main(conn: Connection, options: BatchOptions, log_path: str) -> None:
    """Body of a worker process: take jobs from *conn* until it says None or closes."""
    # Ctrl-C reaches the whole process group; the parent decides what happens to us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Native code (onnx, ONNX Runtime) writes to fds 1 and 2; keep that off the terminal
    # and keep stderr, so the parent can quote it when a worker dies.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    conn.send(("ready",))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if job is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(2, 0)
        last = 0.0

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
        files = sorted(
            (f for f in os.listdir(os.path.join(folder, name)) if re.fullmatch(r"input_\d+\.pb", f)),
            key=lambda f: int(f[6:-3]),
        )
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

    def __init__(self, ctx: Any, options: BatchOptions, log_path: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, options, log_path),
                                daemon=True, name="streamconv-batch-worker")
        self.proc.start()
        child.close()
        self.log_path = log_path
        self.ready = False
        self.dead = False
        self.job: _Job | None = None
        self.started = 0.0
        self.partial = 0

    def give(self, job: _Job) -> bool:
        try:
            self.conn.send(job)
        except OSError:
            self.dead = True
            return False
        self.job, self.started, self.partial = job, time.monotonic(), 0
        return True

    def messages(self) -> Iterator[tuple[Any, ...]]:
        try:
            while not self.dead and self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError):
            self.dead = True

    def gone(self) -> bool:
        return self.dead or self.proc.exitcode is not None

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(_JOIN_SECONDS)
        self.conn.close()

    def death(self) -> str:
        """Why the process ended, with the last line it wrote to stderr if any."""
        self.proc.join(_JOIN_SECONDS)
        code = self.proc.exitcode
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

    def __init__(self, options: BatchOptions, workdir: str,
                 on_result: Callable[[ModelResult], None],
                 on_progress: Callable[[int], None]) -> None:
        self.options = options
        self.workdir = workdir
        self.on_result = on_result
        self.on_progress = on_progress
        self.ctx = multiprocessing.get_context("spawn")
        self.started = 0
        self.start_failures = 0
        self.slots: list[_Slot] = []

    def _start(self) -> _Slot:
        self.started += 1
        return _Slot(self.ctx, self.options, os.path.join(self.workdir, f"worker-{self.started}.log"))

    def _lost(self, slot: _Slot, reason: str) -> None:
        """Report the job of a dead or killed worker as failed and remove its staging folder."""
        job = slot.job
        if job is None:
            return
        slot.job = None
        shutil.rmtree(job.staging, ignore_errors=True)
        self.on_result(ModelResult(
            source=job.rel, destination=job.rel, status=FAILED, action="convert",
            opset_to=self.options.opset, bytes_in=job.size,
            seconds=round(time.monotonic() - slot.started, 4), error=reason,
        ))

    def run(self, jobs: Sequence[_Job]) -> None:
        """Run every job; results arrive through on_result.  Cleans up on any exit."""
        # Largest first, so a huge model starts early and runs beside the small ones.
        pending = deque(sorted(jobs, key=lambda j: (-j.size, j.index)))
        self.slots = [self._start() for _ in range(min(self.options.jobs, len(pending)))]
        retired: list[_Slot] = []
        try:
            while pending or any(s.job is not None for s in self.slots):
                self._wait()
                for i, slot in enumerate(self.slots):
                    for message in slot.messages():
                        self._handle(slot, message)
                    if slot.gone():
                        if slot.job is None and not slot.ready:
                            self.start_failures += 1
                            if self.start_failures >= _MAX_START_FAILURES:
                                raise StreamconvError(
                                    f"worker processes die on start-up ({slot.death()})"
                                )
                        self._lost(slot, f"the converter process died ({slot.death()})")
                        slot.kill()
                        self.slots[i] = self._start()
                    elif slot.job is not None and self._overdue(slot):
                        slot.kill()
                        self._lost(slot, f"timed out after {self.options.timeout:g} s")
                        self.slots[i] = self._start()
                for slot in self.slots:
                    if slot.ready and slot.job is None and pending:
                        job = pending.popleft()
                        if not slot.give(job):
                            pending.appendleft(job)
                if not pending:  # nothing left to hand out: let idle workers go
                    for slot in [s for s in self.slots if s.job is None]:
                        self.slots.remove(slot)
                        retired.append(slot)
                        with contextlib.suppress(OSError):
                            slot.conn.send(None)
        finally:
            with _signals_held():
                self._shutdown(self.slots + retired)

    def _overdue(self, slot: _Slot) -> bool:
        timeout = self.options.timeout
        return timeout is not None and time.monotonic() - slot.started > timeout

    def _wait(self) -> None:
        timeout = None
        if self.options.timeout is not None:
            ends = [s.started + self.options.timeout for s in self.slots if s.job is not None]
            if ends:
                timeout = max(0.0, min(ends) - time.monotonic()) + 0.01
        handles: list[Any] = [s.conn for s in self.slots if not s.dead]
        handles += [s.proc.sentinel for s in self.slots]
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
            slot.job, slot.partial = None, 0
            self.on_result(message[2])

    def _partial_bytes(self) -> int:
        return sum(s.partial for s in self.slots if s.job is not None)

    def _shutdown(self, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            if slot.job is not None or not slot.ready:
                slot.kill()  # interrupted mid-job: the parent, not the worker, cleans up
                if slot.job is not None:
                    shutil.rmtree(slot.job.staging, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    slot.conn.send(None)
        for slot in slots:
            slot.proc.join(_JOIN_SECONDS)
            if slot.proc.is_alive():
                slot.kill()
            slot.conn.close()
