"""Time one command as its own process: wall seconds and peak resident memory.

Each command runs under ``/usr/bin/time``, whose own child is the measured
program, so the peak RSS it reports (``%M``, from ``wait4``) is the program's
alone and not the benchmark's.  Before every run the page cache is put in a
known state for the input (read through, or dropped for that file only), dirty
pages are written back with ``sync`` and block I/O is let settle, so the previous
run's output (and the discards of its deletion) is not billed to this one, and
afterwards the outputs are deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE_MODES",
    "MeasureError",
    "Sample",
    "available_memory",
    "measure",
    "resident_fraction",
]

TIME = "/usr/bin/time"
CACHE_MODES = ("warm", "cold")
_READ_BLOCK = 8 << 20


class MeasureError(RuntimeError):
    """A measured command failed; the message carries its last line of stderr."""


@dataclass(frozen=True)
class Sample:
    """One timed run."""

    wall_s: float
    peak_rss_kib: int
    user_s: float
    sys_s: float
    cached: float | None  # fraction of the input in the page cache when the run began


def available_memory() -> int:
    """Bytes of memory the kernel says can be allocated without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise MeasureError("/proc/meminfo has no MemAvailable line")


def resident_fraction(path: Path) -> float | None:
    """Fraction of *path*'s bytes in the page cache, from util-linux ``fincore``; None if absent."""
    tool = shutil.which("fincore")
    size = path.stat().st_size
    if tool is None or size == 0:
        return None
    out = subprocess.run(
        [tool, "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True, text=True, check=False,
    )
    try:
        return min(1.0, int(out.stdout.split()[0]) / size)
    except (IndexError, ValueError):
        return None


def _warm(path: Path) -> None:
    """Read *path* through once so its pages are cached (as far as memory allows)."""
    buf = bytearray(_READ_BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def _drop(path: Path) -> None:
    """Evict *path*'s clean pages from the page cache; other files are untouched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _killed_first() -> None:
    # If memory runs out, the kernel should kill the measured program, not a neighbour.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _io_in_flight() -> int | None:
    """Block-device requests in progress, over all devices (None where unknown)."""
    try:
        with open("/proc/diskstats") as f:
            return sum(int(line.split()[11]) for line in f if len(line.split()) > 11)
    except (OSError, ValueError):
        return None


def _settle(limit_s: float = 10.0) -> None:
    """Wait until no block I/O is in flight (the previous run's writeback and the
    discards of its deleted outputs), so that it is not billed to the next run."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        busy = _io_in_flight()
        if busy is None:
            return
        quiet = quiet + 1 if busy == 0 else 0
        time.sleep(0.05)


def _remove(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def measure(
    cmd: Sequence[str],
    *,
    input_path: Path,
    outputs: Sequence[Path],
    cache: str = "warm",
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Sample:
    """Run *cmd* once and return its wall time and peak RSS.

    *outputs* are deleted before and after the run.  Raises MeasureError if
    the command exits non-zero (with its last stderr line), ValueError for an
    unknown *cache* mode.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    _remove(outputs)
    if cache == "warm":
        _warm(input_path)
    else:
        _drop(input_path)
    cached = resident_fraction(input_path)
    fd, report = tempfile.mkstemp(prefix="bench-time-", suffix=".txt")
    os.close(fd)
    try:
        os.sync()
        _settle()
        started = time.perf_counter()
        proc = subprocess.run(
            [TIME, "-f", "%M %e %U %S", "-o", report, *cmd],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=cwd, env=env, preexec_fn=_killed_first, check=False,
        )
        wall = time.perf_counter() - started
        with open(report) as f:
            lines = f.read().strip().splitlines()
    finally:
        os.unlink(report)
        _remove(outputs)
        os.sync()
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = err[-1] if err else (lines[0] if lines else "no message")
        raise MeasureError(f"exit status {proc.returncode}: {reason}")
    rss, _elapsed, user, system = lines[-1].split()
    return Sample(wall, int(rss), float(user), float(system), cached)
