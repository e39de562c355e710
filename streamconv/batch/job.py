"""One job: convert or copy one model into place and publish it; a record of what happened.

The job knows nothing of who runs it: the local pool's workers call :func:`run_job`.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..api import convert
from ..errors import StreamconvError
from ..publish import (
    Staging,
    make_folders,
    previous_data_files,
    publish,
)
from ..scan import map_file
from ..skeleton import build_skeleton
from .manifest import file_identity, input_identity
from .options import BatchOptions
from .parity import verify_parity
from .plan import Job, Probe, other_problem, probe_model, size_or_zero
from .report import AT_TARGET, CONVERTED, FAILED, BatchResult, ModelResult, error_text

log = logging.getLogger(__name__)


def _copy_through(job: Job, probe: Probe, options: BatchOptions,
                  progress: Callable[[int], None],
                  folder_syncs: set[str] | None, staging_path: str | None
                  ) -> tuple[int, list[str]]:
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
    staging = Staging(folder, path=staging_path)
    staging.create()
    try:
        for rel, source in sources.items():
            target = staging.file(rel)
            shutil.copyfile(source, target)
            copied += os.path.getsize(target)
            progress(job.size * copied // total)  # the bar counts model-file bytes
        superseded = previous_data_files(folder, name) if os.path.lexists(job.dst) else []
        publish(staging, name, probe.data_files, superseded=superseded,
                protect=list(sources.values()), fsync=options.fsync, deferred=folder_syncs)
    finally:
        staging.cleanup()
    return copied, probe.data_files


def run_job(job: Job, options: BatchOptions, send_progress: Callable[[int], None],
            folder_syncs: set[str] | None = None, staging: str | None = None) -> ModelResult:
    """Convert or copy one model into place; never raises for a model.

    With *folder_syncs*, the folders whose new entries still need a sync (after
    the output's last rename, and the parents of folders made for it) are added
    to it instead of being synced: the caller syncs them before it takes the
    output as durably in place.  *staging* is a staging folder of this process
    to stage the output in, where it is on the output's file system (see
    :class:`streamconv.publish.Staging`).
    """
    if "://" in job.src or "://" in job.dst:
        from .remote import is_remote, run_remote_job

        if is_remote(job.src, job.dst):
            return run_remote_job(job, options, send_progress)
    started = time.perf_counter()
    result = ModelResult(source=job.rel, destination=job.rel, status=FAILED, action="convert",
                         opset_to=options.opset, bytes_in=job.size)
    # taken before anything is read: a change from here on shows on the next run
    source = file_identity(job.src)
    try:
        make_folders(os.path.dirname(job.dst), fsync=options.fsync, deferred=folder_syncs)
        try:
            probe: Probe | None = probe_model(job.src, options.size_threshold)
        except (StreamconvError, OSError):
            probe = None  # convert() names the problem the way a single conversion does
        if probe is not None and source is not None:
            inputs = input_identity(job.src, probe.data_files)
            if inputs is not None and inputs["model"] == source:
                result.inputs = inputs
        if probe is not None:
            result.opset_from = probe.opset
            result.bytes_in = job.size + sum(
                size_or_zero(os.path.join(os.path.dirname(job.src), *f.split("/")))
                for f in probe.data_files
            )
        if probe is not None and probe.opset == options.opset and not options.force_convert:
            result.action = "copy"
            result.bytes_out, result.data_files = _copy_through(
                job, probe, options, send_progress, folder_syncs, staging
            )
            result.tensors_diverted = 0
            result.status = AT_TARGET
            if options.verify:
                result.verify = "not run: copied unchanged"
        else:
            _convert_one(job, probe, options, send_progress, result, folder_syncs, staging)
    except Exception as e:  # one model's failure, whatever it is, must not stop the batch
        result.status = FAILED
        result.error = error_text(e)
        log.debug("%s failed", job.rel, exc_info=True)
    finally:
        result.seconds = round(time.perf_counter() - started, 4)
    return result

def _convert_one(job: Job, probe: Probe | None, options: BatchOptions,
                 send_progress: Callable[[int], None],
                 result: ModelResult, folder_syncs: set[str] | None,
                 staging: str | None) -> None:
    """Convert *job* into place, verifying the staged result first if asked."""
    layout = options.layout
    if layout == "auto" and probe is not None and probe.data_files:
        layout = "external"  # a model that kept its weights apart keeps them apart

    def progress(done: int, total: int) -> None:
        send_progress(job.size * done // total if total else job.size)

    def before_publish(staged: str) -> None:
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
        before_publish=before_publish, folder_syncs=folder_syncs, staging=staging,
    )
    result.warnings = list(report.warnings)
    data_files = [os.path.relpath(report.data_file, os.path.dirname(job.dst)).replace(
        os.sep, "/")] if report.data_file else []
    result.opset_from = report.opset_from
    result.tensors_diverted = report.tensors_diverted
    result.bytes_out = report.bytes_out
    result.data_files = data_files
    result.status = AT_TARGET if report.opset_from == options.opset else CONVERTED

def copy_others(src_dir: str, dst_dir: str, others: Sequence[str], produced: set[str],
                 options: BatchOptions, result: BatchResult) -> None:
    """Copy the files that are neither models nor their data, atomically, if out of date."""
    for rel in others:
        if rel in produced:
            log.warning("not copying %s: a converted model's output has that name", rel)
            continue
        src = os.path.join(src_dir, *rel.split("/"))
        dst = os.path.join(dst_dir, *rel.split("/"))
        problem = other_problem(src_dir, rel)
        if problem is not None:
            result.others_failed.append((rel, problem))
            continue
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
            result.others_failed.append((rel, error_text(e)))
