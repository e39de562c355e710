"""Batch on object storage: SRC_DIR and DST_DIR as URLs (``s3://bucket/zoo/``).

Either side, or both, may be a URL that fsspec knows; the other may be a local
folder.  The models (``*.onnx`` below SRC, ``--include``/``--exclude``
applied) land at the same relative keys below DST, each converted by
:func:`streamconv.convert` straight from and to storage (ranged reads in,
uploads out; see :mod:`streamconv.storage`), or copied through unchanged, with
the data files it references, when it already is at the target opset.  The
workers, of the local pool or of a Dask cluster, read and write the bucket
themselves: no shared file system is needed.

The manifest is an object (or file) at the top of DST, written in one upload
after the batch.  A remote file's identity is what fsspec's ``info`` gives:
size and ETag, version or modification time; an output is up to date only when
its source, its data files, its options and the output objects themselves are
as recorded.  Credentials (``--storage-options``) never enter the manifest.

Not here: ``--copy-other`` and ``--verify`` (they need local folders), and
``--reuse-data``.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

from .. import storage
from ..api import convert
from ..errors import Interrupted, OutputError, StreamconvError, UsageError
from ..skeleton import build_skeleton
from .manifest import MANIFEST, byte_options, file_identity
from .options import BatchOptions
from .plan import Job, Probe, _selected, probe_model
from .report import (
    AT_TARGET,
    CONVERTED,
    FAILED,
    SKIPPED,
    BatchProgress,
    BatchResult,
    ModelResult,
    error_text,
)
from .tree import run_jobs

__all__ = ["Tree", "convert_remote_tree", "dry_run_remote", "is_remote", "run_remote_job"]

log = logging.getLogger(__name__)

#: Bytes of each read and write of a copy through.
COPY_PIECE = 8 << 20


def is_remote(*paths: str) -> bool:
    """Whether any of *paths* is a URL (``proto://``) rather than a local path."""
    return any(storage.is_url(os.fspath(p)) for p in paths)


class Tree:
    """One side of a batch: a local folder or a remote prefix, files named by relative path."""

    def __init__(self, root: str, options: dict[str, Any] | None) -> None:
        root = storage.local_path(os.fspath(root))
        self.remote = storage.is_url(root)
        self.root = root.rstrip("/") if self.remote else root
        self.options = options
        self.fs: Any = None
        self.path = ""
        if self.remote:
            self.fs, self.path = storage.filesystem(self.root, options)
            self.path = self.path.rstrip("/")

    def url(self, rel: str) -> str:
        """The URL or local path of *rel* below this tree."""
        if self.remote:
            return storage.join(self.root, rel)
        return os.path.join(self.root, *rel.split("/"))

    def key(self, rel: str) -> str:
        return posixpath.join(self.path, rel)

    def files(self) -> list[str]:
        """Every file below the tree, as sorted relative POSIX paths."""
        if not self.remote:
            out = []
            for folder, dirs, names in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".streamconv-"))
                rel = os.path.relpath(folder, self.root)
                for name in names:
                    out.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
            return sorted(out)
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.path)
        except FileNotFoundError:
            return []
        except (OSError, ValueError, RuntimeError) as e:
            raise UsageError(f"cannot list {self.root}: {e}") from e
        prefix = self.path + "/"
        return sorted(f[len(prefix):] for f in found if f.startswith(prefix))

    def identity(self, rel: str) -> Any:
        """What identifies the content of *rel* without reading it, or None if it is absent."""
        if not self.remote:
            return file_identity(self.url(rel))
        try:
            try:
                # asked of the store, never of a listing cached earlier: a listing
                # holds fewer fields (no version), and the worker asks the store
                info = self.fs.info(self.key(rel), refresh=True)
            except TypeError:  # a file system without the keyword
                info = self.fs.info(self.key(rel))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RuntimeError) as e:
            log.debug("no identity for %s: %s", rel, e)
            return None
        if info.get("type") == "directory":
            return None
        return storage.RemoteFile(self.url(rel), self.fs, self.key(rel), info).identity()

    def read(self, rel: str) -> bytes | None:
        if not self.remote:
            try:
                with open(self.url(rel), "rb") as f:
                    return f.read()
            except OSError:
                return None
        try:
            return bytes(self.fs.cat_file(self.key(rel)))
        except (OSError, ValueError, RuntimeError):
            return None

    def write(self, rel: str, data: bytes, fsync: bool = True) -> None:
        """Write the small object *rel* whole (one upload; a file replaced atomically)."""
        if self.remote:
            target = storage.RemoteTarget(self.url(rel), self.options)
            try:
                target.create(None, len(data)).write(data)
                target.commit(replace_model_first=False)
            finally:
                target.abort()
            return
        from ..publish import replace_file

        os.makedirs(self.root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".streamconv.batch-", suffix=".tmp", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            replace_file(tmp, self.url(rel), fsync=fsync)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _check(src: Tree, dst: Tree, options: BatchOptions) -> None:
    if options.copy_other:
        raise UsageError("--copy-other needs local SRC_DIR and DST_DIR")
    if options.verify:
        raise UsageError("--verify needs local SRC_DIR and DST_DIR")
    if options.reuse_data:
        raise UsageError("--reuse-data needs local SRC_DIR and DST_DIR")
    if src.remote == dst.remote and src.root.rstrip("/") == dst.root.rstrip("/"):
        raise UsageError("SRC_DIR and DST_DIR are the same folder; outputs would replace inputs")
    if src.remote and dst.remote and (src.root + "/").startswith(dst.root + "/"):
        raise UsageError(f"SRC_DIR {src.root} lies inside DST_DIR {dst.root}; "
                         "outputs could replace inputs")
    if not src.remote and not os.path.isdir(src.root):
        raise UsageError(f"SRC_DIR {src.root} is not a folder")


def _models(src: Tree, dst: Tree, options: BatchOptions) -> list[str]:
    inside = ""
    if src.remote and dst.remote and (dst.root + "/").startswith(src.root + "/"):
        inside = dst.root[len(src.root) + 1:] + "/"  # DST below SRC: not walked
    return [rel for rel in src.files()
            if rel.endswith(".onnx") and not posixpath.basename(rel).startswith(".streamconv")
            and not (inside and rel.startswith(inside))
            and _selected(rel, options.include, options.exclude)]


class _Manifest:
    """The batch's manifest at the top of DST: entries by model, identities of either kind."""

    def __init__(self, dst: Tree, fsync: bool) -> None:
        self.dst = dst
        self.fsync = fsync
        self.entries: dict[str, dict[str, Any]] = {}
        data = dst.read(MANIFEST)
        if data is not None:
            try:
                loaded = json.loads(data)
            except ValueError:
                loaded = None
            if isinstance(loaded, dict) and isinstance(loaded.get("outputs"), dict):
                self.entries = loaded["outputs"]
            else:
                log.warning("%s: unreadable; every model is redone", dst.url(MANIFEST))

    def fresh(self, rel: str, src: Tree, options: BatchOptions) -> dict[str, Any] | None:
        entry = self.entries.get(rel)
        if not isinstance(entry, dict) or entry.get("options") != byte_options(options):
            return None
        inputs, outputs = entry.get("inputs") or {}, entry.get("outputs") or {}
        if _identities(src, rel, list(inputs.get("data", {}))) != inputs:
            return None
        if _identities(self.dst, rel, list(outputs.get("data", {}))) != outputs:
            return None
        return entry

    def record(self, model: ModelResult, options: BatchOptions) -> None:
        if model.inputs is None:
            return  # unknown identity: redone next time, never trusted
        outputs = _identities(self.dst, model.source, model.data_files)
        if outputs is None:
            return
        self.entries[model.source] = {
            "inputs": model.inputs, "outputs": outputs, "options": byte_options(options),
            "status": model.status, "action": model.action, "opset_from": model.opset_from,
            "opset_to": model.opset_to, "tensors_diverted": model.tensors_diverted,
            "bytes_out": model.bytes_out, "data_files": model.data_files,
        }

    def forget(self, rels: list[str]) -> None:
        """Drop the entries of outputs about to be redone, in DST too."""
        dropped = [rel for rel in rels if self.entries.pop(rel, None) is not None]
        if dropped:
            self.save()

    def save(self) -> None:
        data = json.dumps({"format": 1, "outputs": self.entries}, indent=0,
                          sort_keys=True).encode()
        self.dst.write(MANIFEST, data, fsync=self.fsync)


def _identities(tree: Tree, rel: str, data_files: list[str]) -> dict[str, Any] | None:
    """The identity of model *rel* and of its data files (relative to its folder), or None."""
    model = tree.identity(rel)
    if model is None:
        return None
    folder = posixpath.dirname(rel)
    data: dict[str, Any] = {}
    for name in data_files:
        ident = tree.identity(posixpath.normpath(posixpath.join(folder, name)))
        if ident is None:
            return None
        data[name] = ident
    return {"model": model, "data": data}


# -- the job, as a worker runs it ----------------------------------------------------------


def _probe(url: str, options: BatchOptions) -> Probe:
    """:func:`streamconv.batch.plan.probe_model` for a URL: the skeleton over ranged reads."""
    if not storage.is_url(url):
        return probe_model(url, options.size_threshold)
    from .plan import probe_skeleton

    with storage.opened():
        remote = storage.open_remote(url, options.storage_options)
        skeleton = build_skeleton(remote.scan_buffer(), remote.size, url,
                                  options.size_threshold, for_conversion=False)
    return probe_skeleton(skeleton.model)


def run_remote_job(job: Job, options: BatchOptions,
                   send_progress: Callable[[int], None]) -> ModelResult:
    """:func:`streamconv.batch.job.run_job` where the source or destination is a URL."""
    started = time.perf_counter()
    result = ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                         opset_to=options.opset, bytes_in=job.size)
    try:
        src_folder = Tree(storage.parent(job.src) if storage.is_url(job.src)
                          else os.path.dirname(job.src), options.storage_options)
        name = posixpath.basename(job.src)
        source = src_folder.identity(name)  # taken before anything is read
        try:
            probe: Probe | None = _probe(job.src, options)
        except (StreamconvError, OSError):
            probe = None  # convert() names the problem the way a single conversion does
        if probe is not None and source is not None:
            inputs = _identities(src_folder, name, probe.data_files)
            if inputs is not None and inputs["model"] == source:
                result.inputs = inputs
        if probe is not None:
            result.opset_from = probe.opset
        if not storage.is_url(job.dst):
            os.makedirs(os.path.dirname(job.dst), exist_ok=True)
        if probe is not None and probe.opset == options.opset and not options.force_convert:
            result.action = "copy"
            result.bytes_out, result.data_files = _copy_through(job, probe, options)
            result.tensors_diverted = 0
            result.status = AT_TARGET
        else:
            layout = options.layout
            if layout == "auto" and probe is not None and probe.data_files:
                layout = "external"
            data_name = None
            if options.data_name is not None:
                out_name = posixpath.basename(job.dst)
                data_name = options.data_name.format(
                    name=out_name, stem=out_name.removesuffix(".onnx"))

            def progress(done: int, total: int) -> None:
                send_progress(job.size * done // total if total else job.size)

            report = convert(
                job.src, job.dst, opset=options.opset, layout=layout,
                size_threshold=options.size_threshold, align=options.align,
                check=options.check, checksum=options.checksum,
                inline_functions=options.inline_functions, data_name=data_name,
                strict_onnx=options.strict_onnx, fsync=options.fsync, progress=progress,
                storage_options=options.storage_options,
            )
            result.warnings = list(report.warnings)
            result.opset_from = report.opset_from
            result.tensors_diverted = report.tensors_diverted
            result.bytes_out = report.bytes_out
            result.data_files = [posixpath.basename(report.data_file)] if report.data_file \
                else []
            if report.data_file and data_name is not None:
                result.data_files = [data_name]
            result.status = AT_TARGET if report.opset_from == options.opset else CONVERTED
    except Exception as e:  # one model's failure must not stop the batch
        result.status = FAILED
        result.error = error_text(e)
        log.debug("%s failed", job.rel, exc_info=True)
    finally:
        result.seconds = round(time.perf_counter() - started, 4)
    return result


def _copy_through(job: Job, probe: Probe, options: BatchOptions) -> tuple[int, list[str]]:
    """Copy the model and its data files unchanged, data first; return (bytes, data files).

    The references are checked as a conversion checks them (containment, sizes).
    """
    if probe.external_tensors:
        with storage.opened():
            if storage.is_url(job.src):
                remote = storage.open_remote(job.src, options.storage_options)
                build_skeleton(remote.scan_buffer(), remote.size, job.src,
                               options.size_threshold, for_conversion=True)
            else:
                probe_model(job.src, options.size_threshold)
    src = Tree(storage.parent(job.src) if storage.is_url(job.src) else os.path.dirname(job.src),
               options.storage_options)
    dst_url = job.dst
    names = [*probe.data_files, posixpath.basename(job.src)]
    copied = 0
    if storage.is_url(dst_url):
        target = storage.RemoteTarget(dst_url, options.storage_options)
        try:
            for rel in names:
                is_model = rel == names[-1]
                out = target.create(None if is_model else rel)
                copied += _copy_stream(src, rel, out)
            replace = bool(probe.data_files) and target.exists(probe.data_files[0])
            target.commit(replace_model_first=replace)
        finally:
            target.abort()
        return copied, probe.data_files
    from ..publish import Staging, previous_data_files, publish

    folder = os.path.dirname(dst_url)
    staging = Staging(folder)
    staging.create()
    try:
        for rel in names:
            is_model = rel == names[-1]
            with open(staging.file(os.path.basename(dst_url) if is_model else rel), "wb") as f:
                copied += _copy_stream(src, rel, f)
        name = os.path.basename(dst_url)
        superseded = previous_data_files(folder, name) if os.path.lexists(dst_url) else []
        publish(staging, name, probe.data_files, superseded=superseded, fsync=options.fsync)
    finally:
        staging.cleanup()
    return copied, probe.data_files


def _copy_stream(src: Tree, rel: str, out: Any) -> int:
    """Copy file *rel* of *src* into *out* in ranged reads of :data:`COPY_PIECE`."""
    if not src.remote:
        n = 0
        with open(src.url(rel), "rb") as f:
            while True:
                data = f.read(COPY_PIECE)
                if not data:
                    return n
                out.write(data)
                n += len(data)
    info = src.fs.info(src.key(rel))
    remote = storage.RemoteFile(src.url(rel), src.fs, src.key(rel), info)
    remote.expect([(0, remote.size)])
    try:
        pos = 0
        while pos < remote.size:
            piece = remote.pread(COPY_PIECE, pos)
            out.write(piece)
            pos += len(piece)
        return pos
    finally:
        remote.close()


# -- the batch -------------------------------------------------------------------------------


def convert_remote_tree(src_dir: str, dst_dir: str, options: BatchOptions,
                        progress: Callable[[BatchProgress], None] | None = None) -> BatchResult:
    """:func:`streamconv.batch.convert_tree` where SRC_DIR or DST_DIR is a URL."""
    started = time.perf_counter()
    src = Tree(src_dir, options.storage_options)
    dst = Tree(dst_dir, options.storage_options)
    _check(src, dst, options)
    result = BatchResult(src_dir, dst_dir, options)
    manifest: _Manifest | None = None
    try:
        if not dst.remote:
            try:
                os.makedirs(dst.root, exist_ok=True)
            except OSError as e:
                raise OutputError(f"cannot create DST_DIR {dst.root}: {e.strerror}") from e
        manifest = _Manifest(dst, options.fsync)
        jobs: list[Job] = []
        for index, rel in enumerate(_models(src, dst, options)):
            entry = None if options.force else manifest.fresh(rel, src, options)
            if entry is not None:
                result.models.append(ModelResult(
                    source=rel, destination=rel, status=SKIPPED, action="skip",
                    opset_from=entry.get("opset_from"), opset_to=entry.get("opset_to"),
                    bytes_out=entry.get("bytes_out"),
                    tensors_diverted=entry.get("tensors_diverted"),
                    data_files=list(entry.get("data_files", [])),
                ))
                continue
            ident = src.identity(rel)
            size = int(ident["size"] if isinstance(ident, dict) else ident[0]) if ident else 0
            jobs.append(Job(index, rel, src.url(rel), dst.url(rel), size))
        manifest.forget([j.rel for j in jobs])

        def record(model: ModelResult) -> None:
            if model.status in (CONVERTED, AT_TARGET) and manifest is not None:
                manifest.record(model, options)

        try:
            run_jobs(jobs, options, result, progress, record)
        finally:
            if dst.remote:
                # a worker that was killed (timeout, crash, Ctrl-C) could not abort
                # its uploads: the parts it sent would stay, billed, out of sight
                done = {m.source for m in result.models if m.status in (CONVERTED, AT_TARGET)}
                unfinished: list[str] = []
                for job in jobs:
                    if job.rel in done:
                        continue
                    name = posixpath.basename(job.dst)
                    data = f"{name}.data" if options.data_name is None else \
                        options.data_name.format(name=name, stem=name.removesuffix(".onnx"))
                    unfinished += [job.dst, storage.join(storage.parent(job.dst), data)]
                if unfinished:
                    storage.abort_uploads(unfinished, options.storage_options)
    except Interrupted as e:
        result.interrupted = int(e.args[0]) if e.args else signal.SIGINT
    except KeyboardInterrupt:
        result.interrupted = int(signal.SIGINT)
    finally:
        if manifest is not None:
            try:
                manifest.save()
            except (OSError, StreamconvError) as e:  # costs the next run a redo, no more
                log.warning("cannot write %s: %s", dst.url(MANIFEST), error_text(e))
        result.models.sort(key=lambda m: m.source)
        result.seconds = time.perf_counter() - started
    return result


def dry_run_remote(src_dir: str, dst_dir: str,
                   options: BatchOptions) -> list[tuple[str, str, str]]:
    """What a remote batch would do: ``(action, path, detail)`` rows (nothing is probed)."""
    src = Tree(src_dir, options.storage_options)
    dst = Tree(dst_dir, options.storage_options)
    _check(src, dst, options)
    manifest = _Manifest(dst, options.fsync)
    rows = []
    for rel in _models(src, dst, options):
        if not options.force and manifest.fresh(rel, src, options) is not None:
            rows.append(("skip", rel, "up to date"))
        else:
            rows.append(("convert", rel, "convert, or copy if at the target"))
    return rows

