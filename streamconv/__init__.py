"""streamconv: convert ONNX models between opset versions as a stream.

Models of any size — inline past 2 GiB, with external data, or whole folders —
are converted without loading their weights.
"""

from .api import LAYOUTS, Reach, Report, convert, reachable, roundtrip
from .errors import (
    ConversionError,
    ExternalDataError,
    LimitError,
    OutputError,
    StreamconvError,
    UsageError,
    WireFormatError,
)

__all__ = [
    "LAYOUTS",
    "ConversionError",
    "ExternalDataError",
    "LimitError",
    "OutputError",
    "Reach",
    "Report",
    "StreamconvError",
    "UsageError",
    "WireFormatError",
    "convert",
    "reachable",
    "roundtrip",
]

__version__ = "0.1.0"
