"""What the command line imports and sets up before it converts (no timings here).

Start-up is a fixed cost every CLI call pays; the benchmark measures it (see the
README's Benchmark section).  These tests keep the things that made it small from
coming undone: the dependency versions that import quickly, and lazy imports.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirement(name: str) -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for line in config["options"]["install_requires"].splitlines():
        line = line.strip()
        if re.match(rf"{re.escape(name)}\b", line, re.IGNORECASE):
            return line
    raise AssertionError(f"{name} is not in setup.cfg's install_requires")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_ml_dtypes_is_the_constrained_version() -> None:
    # the suite runs with what setup.cfg lets a fresh install resolve
    requirement = _requirement("ml_dtypes")
    assert "<0.7" in requirement.replace(" ", "")
    installed = _version(importlib.metadata.version("ml_dtypes"))
    assert (0, 5, 4) <= installed < (0, 7), installed
