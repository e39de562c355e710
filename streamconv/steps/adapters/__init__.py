"""streamconv's own adapters, one module per op family; importing this registers them."""

from . import softmax  # noqa: F401
