"""What the command line imports and sets up before it converts (no timings here).

Start-up is a fixed cost every CLI call pays; the benchmark measures it (see the
README's Benchmark section).  These tests keep the things that made it small from
coming undone: the dependency versions that import quickly, and lazy imports.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

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


def _tiny(path: Path, opset: int) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.save(model, str(path))


def _probe(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_cli_imports_onnx_only_to_convert_and_steps_only_to_downgrade(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _tiny(src, 11)
    code = f"""
import json, os, sys
os.environ.pop("OPENBLAS_NUM_THREADS", None)
import streamconv.cli
before = sorted(m for m in ("onnx", "numpy", "streamconv.steps") if m in sys.modules)
code = streamconv.cli.main([{str(src)!r}, {str(tmp_path / "up.onnx")!r}, "--opset", "13", "-q"])
after = sorted(m for m in ("onnx", "streamconv.steps") if m in sys.modules)
print(json.dumps({{"code": code, "before": before, "after": after,
                  "blas": os.environ.get("OPENBLAS_NUM_THREADS")}}))
"""
    seen = _probe(code)
    assert seen["code"] == 0
    assert seen["before"] == []  # the CLI module itself stays light
    assert seen["after"] == ["onnx"]  # an upgrade never loads the downgrade layer
    assert seen["blas"] == "1"


def test_cli_keeps_a_thread_count_the_user_set(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    _tiny(src, 11)
    code = f"""
import json, os
os.environ["OPENBLAS_NUM_THREADS"] = "3"
import streamconv.cli
code = streamconv.cli.main([{str(src)!r}, {str(tmp_path / "up.onnx")!r}, "--opset", "13", "-q"])
print(json.dumps({{"code": code, "blas": os.environ["OPENBLAS_NUM_THREADS"]}}))
"""
    assert _probe(code) == {"code": 0, "blas": "3"}
