"""Scripts that build malicious or broken ONNX files, one attack per module.

Each module documents what its file does and what streamconv must answer, and
defines ``EXPECT`` (a fragment of the one-line error the converter must give,
and verify too when it cannot read the model; or None when the file is valid
and must convert), ``VERIFY`` (the exit code
``streamconv verify`` must give: 0 all sound, 1 a problem reported, 2 an
unreadable model) and ``build(folder) -> Path``, which writes the attack into
*folder* and returns the model's path.  The model
itself always sits in ``folder/model/``; anything it tries to reach lies
beside that folder.  Run one by hand with ``python -m attacks.<name> FOLDER``.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

__all__ = ["names"]


def names() -> list[str]:
    """Names of every attack module, sorted."""
    return sorted(
        m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if not m.name.startswith("_")
    )
