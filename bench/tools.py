"""The tools the benchmark times, each as a command line run in its own process."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PROTOBUF_LIMIT", "TARGET_OPSET", "TOOLS", "Tool", "tool_by_name"]

TARGET_OPSET = 18
#: Largest message protobuf parses; the in-memory paths cannot open bigger models.
PROTOBUF_LIMIT = (1 << 31) - 1


@dataclass(frozen=True)
class Tool:
    """One measured tool: how to run it, what it writes, what it needs.

    ``memory_factor`` is the in-memory paths' peak RSS per byte of input (measured
    on this benchmark's models, with some headroom); 0 means memory does not grow
    with the model.  ``whole_model`` tools parse the model with protobuf, so
    they cannot run past :data:`PROTOBUF_LIMIT`.
    """

    name: str
    label: str
    argv: tuple[str, ...]
    sidecar: bool = False
    whole_model: bool = False
    memory_factor: float = 0.0
    floor: bool = False

    def command(self, src: Path, dst: Path) -> list[str]:
        """The command line that converts (or copies) *src* to *dst*."""
        return [
            str(src) if a == "{src}" else str(dst) if a == "{dst}" else a for a in self.argv
        ]

    def outputs(self, dst: Path) -> list[Path]:
        """Every file the command writes for destination *dst*."""
        return [dst, dst.with_name(dst.name + ".data")] if self.sidecar else [dst]


_PY = sys.executable
_OPSET = str(TARGET_OPSET)

TOOLS: tuple[Tool, ...] = (
    Tool("import_numpy", 'python -c "import numpy"', (_PY, "-c", "import numpy"), floor=True),
    Tool("cp", "cp", ("cp", "{src}", "{dst}")),
    Tool(
        "copy_file_range", "os.copy_file_range copy",
        (_PY, "-m", "bench.copyrange", "{src}", "{dst}"),
    ),
    Tool(
        "copy_file_range_fsync", "os.copy_file_range copy + fsync",
        (_PY, "-m", "bench.copyrange", "--fsync", "{src}", "{dst}"),
    ),
    Tool(
        "streamconv_external", "streamconv --layout external",
        (_PY, "-m", "streamconv", "{src}", "{dst}", "--opset", _OPSET, "--layout", "external",
         "-q"),
        sidecar=True,
    ),
    Tool(
        "streamconv_inline", "streamconv --layout inline",
        (_PY, "-m", "streamconv", "{src}", "{dst}", "--opset", _OPSET, "--layout", "inline",
         "-q"),
    ),
    Tool(
        "streamconv_external_nofsync", "streamconv --layout external --no-fsync",
        (_PY, "-m", "streamconv", "{src}", "{dst}", "--opset", _OPSET, "--layout", "external",
         "--no-fsync", "-q"),
        sidecar=True,
    ),
    Tool(
        "streamconv_inline_nofsync", "streamconv --layout inline --no-fsync",
        (_PY, "-m", "streamconv", "{src}", "{dst}", "--opset", _OPSET, "--layout", "inline",
         "--no-fsync", "-q"),
    ),
    Tool(
        "onnx", "onnx load+convert_version+save",
        (_PY, "-m", "bench.workers", "onnx", "{src}", "{dst}", "--opset", _OPSET),
        whole_model=True, memory_factor=6.5,
    ),
    Tool(
        "onnx_ir", "onnx_ir + onnxscript converter",
        (_PY, "-m", "bench.workers", "onnx_ir", "{src}", "{dst}", "--opset", _OPSET),
        whole_model=True, memory_factor=4.5,
    ),
)


def tool_by_name(name: str) -> Tool:
    """The tool called *name*; raises KeyError naming the known tools."""
    for tool in TOOLS:
        if tool.name == name:
            return tool
    raise KeyError(f"no tool {name!r}; known: {', '.join(t.name for t in TOOLS)}")
