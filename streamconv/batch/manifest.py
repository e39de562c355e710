"""What a batch wrote, recorded beside the outputs, so that a rerun is never wrong.

One small JSON file at the top of DST (:data:`MANIFEST`) holds, per output, the
identity of the source and of each external-data file it read (size, mtime in
nanoseconds, inode), the options that change the output's bytes, streamconv's
version, the identity of the output files as written, and what the output is
(opsets, layout, data files).  An output is up to date only when all of these
still hold; nothing is guessed from the order of timestamps.

Entries are written by the parent only, after their output is in place, and an
entry is dropped from the file on disk before its model is redone: a batch
killed at any moment leaves outputs without entries (redone next time), never
an entry describing bytes that are not on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..publish import replace_file
from .options import BatchOptions

__all__ = ["MANIFEST", "Manifest", "byte_options", "file_identity", "input_identity"]

log = logging.getLogger(__name__)

#: The manifest's name, at the top of DST.  Not a ".streamconv-" name: those are
#: staging folders, removed when their owner is gone.
MANIFEST = ".streamconv.batch.json"
_FORMAT = 1
#: The manifest is rewritten at most this often while a batch runs (and at its end)...
_SAVE_EVERY = 2.0
#: ... and at most this fraction of the time: a rewrite costs time in proportion to
#: the entries, so the interval grows with them and a long batch stays linear.
_SAVE_SHARE = 0.05

#: What identifies a file's contents without reading them: [size, mtime_ns, inode].
Identity = list[int]


def file_identity(path: str) -> Identity | None:
    """``[size, mtime_ns, inode]`` of the file at *path* (symlinks followed), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def byte_options(options: BatchOptions) -> dict[str, Any]:
    """The options that change an output's bytes (not jobs, timeouts, globs, fsync)."""
    return {
        "opset": options.opset, "layout": options.layout,
        "size_threshold": options.size_threshold, "align": options.align,
        "check": options.check, "checksum": options.checksum,
        "inline_functions": options.inline_functions, "reuse_data": options.reuse_data,
        "data_name": options.data_name, "strict_onnx": options.strict_onnx,
        "force_convert": options.force_convert, "streamconv": __version__,
    }


def input_identity(src: str, data_files: Sequence[str]) -> dict[str, Any] | None:
    """The identity of *src* and of its data files (relative to its folder), or None."""
    model = file_identity(src)
    if model is None:
        return None
    folder = os.path.dirname(src)
    data: dict[str, Identity] = {}
    for rel in data_files:
        ident = file_identity(os.path.join(folder, *rel.split("/")))
        if ident is None:
            return None
        data[rel] = ident
    return {"model": model, "data": data}


class Manifest:
    """The manifest of one DST folder, loaded, changed in memory, saved atomically."""

    def __init__(self, dst_dir: str, fsync: bool = True) -> None:
        self.path = os.path.join(dst_dir, MANIFEST)
        self.fsync = fsync
        self.entries: dict[str, dict[str, Any]] = {}
        self._saved_at = 0.0
        self._save_seconds = 0.0
        self._dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(
                    data.get("outputs"), dict):
                self.entries = data["outputs"]
            else:
                log.warning("%s: not a manifest this version writes; every model is redone",
                            self.path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            # an unreadable manifest only costs a full rerun
            log.warning("%s: unreadable (%s); every model is redone", self.path, e)

    def fresh(self, rel: str, src: str, dst: str, options: BatchOptions) -> dict[str, Any] | None:
        """The entry for *rel* if its output is up to date, else None."""
        entry = self.entries.get(rel)
        if not isinstance(entry, dict) or entry.get("options") != byte_options(options):
            return None
        inputs, outputs = entry.get("inputs") or {}, entry.get("outputs") or {}
        if input_identity(src, list(inputs.get("data", {}))) != inputs:
            return None
        if input_identity(dst, list(outputs.get("data", {}))) != outputs:
            return None
        return entry

    def forget(self, rels: Sequence[str]) -> None:
        """Drop the entries of outputs about to be redone, on disk too."""
        dropped = [rel for rel in rels if self.entries.pop(rel, None) is not None]
        if dropped:
            self._dirty = True
            self.save()

    def record(self, rel: str, dst: str, inputs: dict[str, Any] | None, options: BatchOptions,
               what: dict[str, Any]) -> None:
        """Note that *dst* (model at *rel*) now holds *what*, made from *inputs*."""
        outputs = input_identity(dst, what.get("data_files", []))
        if inputs is None or outputs is None:
            return  # unknown identity: the output is redone next time, never trusted
        self.entries[rel] = {"inputs": inputs, "outputs": outputs,
                             "options": byte_options(options), **what}
        self._dirty = True
        interval = max(_SAVE_EVERY, self._save_seconds / _SAVE_SHARE)
        if time.monotonic() - self._saved_at >= interval:
            self.save()

    def save(self) -> None:
        """Write the manifest atomically (synced unless --no-fsync), if it changed."""
        if not self._dirty:
            return
        started = time.monotonic()
        folder = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".streamconv.batch-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                # one entry a line; json's C encoder (indent would take the slow one)
                f.write(f'{{"format": {_FORMAT}, "outputs": {{\n')
                f.write(",\n".join(f"{json.dumps(rel)}: {json.dumps(entry, sort_keys=True)}"
                                   for rel, entry in sorted(self.entries.items())))
                f.write("\n}}\n")
            replace_file(tmp, self.path, fsync=self.fsync)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._dirty = False
        self._saved_at = time.monotonic()
        self._save_seconds = self._saved_at - started
