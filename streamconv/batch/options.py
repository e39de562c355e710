"""How a batch runs: its options, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import DEFAULT_ALIGN, DEFAULT_THRESHOLD, LAYOUTS
from ..converter import validate_target
from ..errors import UsageError


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs; see ``python -m streamconv batch --help`` for each option."""

    opset: int
    jobs: int = 1
    layout: str = "auto"
    size_threshold: int = DEFAULT_THRESHOLD
    align: int = DEFAULT_ALIGN
    check: bool = True
    force: bool = False
    force_convert: bool = False
    timeout: float | None = None
    verify: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    copy_other: bool = False
    strict_onnx: bool = False
    fsync: bool = True
    checksum: bool = False
    inline_functions: bool = False
    reuse_data: bool = False
    #: data-file name for each output, ``{name}`` (the model's file name) or ``{stem}``
    #: (without ``.onnx``) filled in; None: ``<model>.data``
    data_name: str | None = None
    #: run the jobs on a Dask cluster: a scheduler address, or "local" for a
    #: LocalCluster of ``jobs`` worker processes; None: the local pool
    scheduler: str | None = None
    #: a Dask scheduler file, instead of *scheduler*
    scheduler_file: str | None = None
    #: fsspec options for SRC_DIR/DST_DIR URLs (``--storage-options``); never recorded
    storage_options: dict[str, Any] | None = None

    def validate(self) -> None:
        """Raise UsageError naming the first invalid option."""
        validate_target(self.opset)
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not isinstance(self.size_threshold, int) or self.size_threshold < 0:
            raise UsageError(f"--size-threshold must be >= 0, got {self.size_threshold}")
        align = self.align
        if not isinstance(align, int) or align < 1 or align & (align - 1) or align > 1 << 16:
            raise UsageError(f"--align must be a power of two from 1 to 65536, got {align}")
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError(f"--timeout must be > 0 seconds, got {self.timeout:g}")
        for name, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for pattern in patterns:
                if not pattern:
                    raise UsageError(f"{name} needs a non-empty glob")
        if self.data_name is not None:
            if "{name}" not in self.data_name and "{stem}" not in self.data_name:
                # one fixed name would make every model of a folder share one data file
                raise UsageError(f"batch --data-name must contain {{name}} or {{stem}}, "
                                 f"got {self.data_name!r}")
            try:
                self.data_name.format(name="m.onnx", stem="m")
            except (KeyError, IndexError, ValueError) as e:
                raise UsageError(f"--data-name {self.data_name!r}: only {{name}} and "
                                 f"{{stem}} may be filled in ({e})") from e
        if self.scheduler is not None and self.scheduler_file is not None:
            raise UsageError("--scheduler and --scheduler-file exclude each other")
        if self.scheduler == "":
            raise UsageError("--scheduler needs an address (tcp://host:8786) or 'local'")
        if (self.scheduler or self.scheduler_file) and not _have("distributed"):
            raise UsageError("--scheduler needs Dask distributed: pip install 'streamconv[dask]'")
        if self.verify and not _have_onnxruntime():
            raise UsageError("--verify needs onnxruntime (pip install onnxruntime)")

def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _have_onnxruntime() -> bool:
    return _have("onnxruntime")
