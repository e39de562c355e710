"""The reference copy: every byte of a file read and written once, inside the kernel.

``python -m bench.copyrange SRC DST`` copies SRC to DST with ``os.copy_file_range``
and nothing else, so its wall time is the floor any file-to-file tool can reach
on this machine.  With ``--fsync`` it then syncs the file and its folder, the
floor for a durable copy (streamconv syncs its outputs by default).  It imports
only ``os`` and ``sys`` to keep start-up negligible.
"""

from __future__ import annotations

import os
import sys

__all__ = ["copy_file", "main"]

# Ask for everything at once, as coreutils' cp does; the kernel copies up to
# about 2 GiB per call.  (Requests of 64 MiB at explicit offsets measured up to
# 1.5x slower here on 8 GB files.)
_STEP = 1 << 62


def copy_file(src: str, dst: str, fsync: bool = False) -> int:
    """Copy *src* to a new file *dst* with ``os.copy_file_range``; return bytes copied.

    With *fsync*, the file and then its folder are synced before returning.

    Raises OSError if either file cannot be opened or the copy fails, and
    EOFError if *src* ends before the size it had when opened.
    """
    src_fd = os.open(src, os.O_RDONLY)
    try:
        dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            size = os.fstat(src_fd).st_size
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            done = 0
            while done < size:
                n = os.copy_file_range(src_fd, dst_fd, _STEP)
                if n == 0:
                    raise EOFError(f"{src} ended at byte {done} of {size}")
                done += n
            if fsync:
                os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if fsync:
        folder = os.open(os.path.dirname(os.path.abspath(dst)), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return done


def main(argv: list[str] | None = None) -> int:
    """Command line: ``SRC DST``; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    fsync = "--fsync" in args
    args = [a for a in args if a != "--fsync"]
    if len(args) != 2:
        print("usage: python -m bench.copyrange [--fsync] SRC DST", file=sys.stderr)
        return 2
    try:
        copy_file(args[0], args[1], fsync)
    except (OSError, EOFError) as e:
        print(f"copyrange: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
