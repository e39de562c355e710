"""Shared test helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def leftovers(folder: str | os.PathLike[str]) -> list[str]:
    """Temporary files or folders streamconv may have left in *folder*."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".streamconv-"))


class Hang(BaseException):
    """A conversion ran past its time limit (BaseException: nothing may swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the block once *seconds* have passed (SIGALRM)."""
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run(path: str | os.PathLike[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The model's outputs in ONNX Runtime (CPU)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)  # type: ignore[no-any-return]


def same_outputs(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                 feeds: dict[str, np.ndarray]) -> None:
    """*dst* gives *src*'s outputs in ONNX Runtime."""
    for a, b in zip(run(src, feeds), run(dst, feeds), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
