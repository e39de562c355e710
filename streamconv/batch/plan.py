"""Finding the work: the models and other files below SRC, what is up to date, the dry run."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from ..api import open_input
from ..converter import DEFAULT_DOMAINS
from ..errors import StreamconvError, UsageError
from ..publish import (
    data_location,
)
from ..scan import map_file
from ..skeleton import build_skeleton, iter_stub_tensors, stub_id
from .manifest import Manifest
from .options import BatchOptions
from .report import FAILED, SKIPPED, BatchResult, ModelResult, error_text


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
    try:  # a folder is DST when it is the same file (cheaper than a realpath per folder)
        st = os.stat(dst_dir)
        dst_id: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        dst_id = None  # not there yet: nothing to leave out

    def is_dst(path: str) -> bool:
        if dst_id is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == dst_id

    models: list[str] = []
    others: list[str] = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".streamconv-") and not is_dst(os.path.join(root, d))
        )
        rel_root = os.path.relpath(root, src_dir)
        for name in sorted(files):
            if name.startswith(".streamconv"):  # staging folders, the manifest
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
class Probe:
    """What a quick look at a model file tells: its ai.onnx opset and its data files."""

    opset: int | None
    #: usable external-data locations, normalized, each once
    data_files: list[str]
    #: tensors stored as external data, usable location or not
    external_tensors: int
    model: onnx.ModelProto


def probe_model(path: str, threshold: int) -> Probe:
    """Scan *path* into a skeleton (payloads stay on disk).

    External-data locations are listed as written (normalized); they are not
    checked here.  Raises StreamconvError for a file that is not a model.
    """
    # non-blocking, regular files only: a FIFO named *.onnx must not hang a probe
    fd, size = open_input(path)
    buf: Any = None
    try:
        buf = map_file(fd, size)
        skeleton = build_skeleton(buf, size, path, threshold, for_conversion=False)
    finally:
        if buf is not None and hasattr(buf, "close"):
            buf.close()
        os.close(fd)
    return probe_skeleton(skeleton.model)


def probe_skeleton(model: onnx.ModelProto) -> Probe:
    """What a scanned skeleton (not for conversion) tells: opset and data files."""
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
    return Probe(max(versions) if versions else None, data_files, external, model)


@dataclass(frozen=True)
class Job:
    index: int
    rel: str
    src: str
    dst: str
    size: int

    @property
    def root(self) -> str:
        """DST, the folder *rel* starts from."""
        path = self.dst
        for _ in range(self.rel.count("/") + 1):
            path = os.path.dirname(path)
        return path

def size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0

def _referenced_data(src_dir: str, models: Sequence[str], threshold: int) -> set[str]:
    """Every file below *src_dir* that a model references as external data."""
    referenced: set[str] = set()
    for rel in models:
        folder = os.path.dirname(rel)
        try:
            probe = probe_model(os.path.join(src_dir, *rel.split("/")), threshold)
        except (StreamconvError, OSError):
            continue
        referenced.update(posix_join(folder, f) for f in probe.data_files)
    return referenced


def plan_work(src_dir: str, dst_dir: str, options: BatchOptions, result: BatchResult,
              manifest: Manifest) -> tuple[list[Job], list[str], set[str]]:
    """Find the work: jobs to run, other files to copy, and paths the outputs occupy.

    Models whose output is up to date by *manifest* go straight into *result* as
    skipped, described as the manifest records them (what is on disk).
    """
    models, others = find_files(src_dir, dst_dir, options.include, options.exclude)
    jobs: list[Job] = []
    produced: set[str] = set()
    for index, rel in enumerate(models):
        src = os.path.join(src_dir, *rel.split("/"))
        dst = os.path.join(dst_dir, *rel.split("/"))
        produced.add(rel)
        problem = not_regular(src)
        if problem is not None:
            result.models.append(ModelResult(
                source=rel, destination=rel, status=FAILED, action="convert",
                opset_to=options.opset, error=problem,
            ))
            continue
        entry = None if options.force else manifest.fresh(rel, src, dst, options)
        if entry is not None:
            data = [posix_join(os.path.dirname(rel), f) for f in entry.get("data_files", [])]
            produced.update(data)
            result.models.append(ModelResult(
                source=rel, destination=rel, status=SKIPPED, action="skip",
                opset_from=entry.get("opset_from"), opset_to=entry.get("opset_to"),
                bytes_in=size_or_zero(src), bytes_out=entry.get("bytes_out"),
                tensors_diverted=entry.get("tensors_diverted"), data_files=data,
            ))
            continue
        jobs.append(Job(index, rel, src, dst, size_or_zero(src)))
    if options.copy_other:
        readable = [m for m in models if not_regular(os.path.join(src_dir, *m.split("/"))) is None]
        referenced = _referenced_data(src_dir, readable, options.size_threshold)
        others = [o for o in others if o not in referenced]
    else:
        others = []
    return jobs, others, produced


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISDIR, "a folder"))


def not_regular(path: str) -> str | None:
    """Why *path* (symbolic links followed) is not a regular file to read, or None.

    Only ``stat`` is called: nothing is opened, so a FIFO cannot block.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "not a regular file: a broken symbolic link"
    except OSError as e:
        return f"cannot be read: {e.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "of an unknown kind")
    return f"not a regular file: {kind}"


def outside(path: str, root: str) -> bool:
    """Whether *path* resolves (through symbolic links) to a place outside *root*."""
    real_root = os.path.realpath(root)
    return os.path.commonpath([real_root, os.path.realpath(path)]) != real_root


def posix_join(folder: str, name: str) -> str:
    """*name* (relative POSIX) inside relative POSIX *folder*, normalized."""
    return os.path.normpath(os.path.join(folder, name)).replace(os.sep, "/")

def dry_run(src_dir: str, dst_dir: str, options: BatchOptions) -> list[tuple[str, str, str]]:
    """What a batch would do, without writing anything: ``(action, path, detail)`` rows.

    Raises UsageError for bad options or folders.
    """
    options.validate()
    if "://" in src_dir or "://" in dst_dir:
        from .remote import dry_run_remote, is_remote

        if is_remote(src_dir, dst_dir):
            return dry_run_remote(src_dir, dst_dir, options)
    check_folders(src_dir, dst_dir)
    result = BatchResult(src_dir, dst_dir, options)
    jobs, others, _ = plan_work(src_dir, dst_dir, options, result, Manifest(dst_dir))
    rows = [("skip", m.source, "up to date") if m.status == SKIPPED
            else ("fail", m.source, m.error or "") for m in result.models]
    for job in jobs:
        try:
            probe = probe_model(job.src, options.size_threshold)
        except (StreamconvError, OSError) as e:
            rows.append(("convert", job.rel, f"unreadable, will fail: {error_text(e)}"))
            continue
        data = f" + {len(probe.data_files)} data file(s)" if probe.data_files else ""
        if probe.opset is None:
            rows.append(("convert", job.rel, "imports no ai.onnx opset, will fail"))
        elif probe.opset == options.opset and not options.force_convert:
            rows.append(("copy", job.rel, f"already at opset {probe.opset}{data}"))
        else:
            rows.append(("convert", job.rel, f"opset {probe.opset} -> {options.opset}{data}"))
    for rel in others:
        problem = other_problem(src_dir, rel)
        rows.append(("fail", rel, problem) if problem else ("copy-other", rel, ""))
    return sorted(rows, key=lambda r: (r[0] == "copy-other", r[1]))


def other_problem(src_dir: str, rel: str) -> str | None:
    """Why the other file *rel* must not be copied, or None.

    A symbolic link is followed only when it stays inside SRC_DIR: a link to
    ``/etc/passwd`` must not publish that file below DST_DIR.
    """
    path = os.path.join(src_dir, *rel.split("/"))
    if os.path.islink(path) and outside(path, src_dir):
        return "a symbolic link to outside SRC_DIR; not followed"
    return not_regular(path)
