"""The conversion layer past onnx's adapters: step table, adapters, expansion, driver.

It works on the small skeleton only (never on payloads) and crosses opset
steps one at a time, using onnx's adapter where onnx has a correct one and
streamconv's own where onnx has none or a wrong one.
"""

from ._context import ADAPTERS, Refusal, StepContext, adapter
from ._driver import Obstacle, OnnxStepError, StepError, convert_down, lowest_opset
from ._table import REPLACES_ONNX, STEPS, Kind, Step, find_step

__all__ = [
    "ADAPTERS",
    "REPLACES_ONNX",
    "STEPS",
    "Kind",
    "Obstacle",
    "OnnxStepError",
    "Refusal",
    "Step",
    "StepContext",
    "StepError",
    "adapter",
    "convert_down",
    "find_step",
    "lowest_opset",
]
