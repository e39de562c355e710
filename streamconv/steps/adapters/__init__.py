"""streamconv's own adapters, one module per op family.

Importing this package imports every module in it, which registers each
adapter in :data:`streamconv.steps.ADAPTERS` (see :func:`streamconv.steps.adapter`).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
