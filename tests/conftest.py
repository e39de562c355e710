"""Shared test helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def leftovers(folder: str | os.PathLike[str]) -> list[str]:
    """Temporary files or folders streamconv may have left in *folder*."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".streamconv-"))


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
