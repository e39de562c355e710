import logging
import os
import sys

from .cli import main

code = main()
# Leave without tearing the interpreter down: with onnx and numpy loaded that
# takes longer than converting a small model.  Everything streamconv wrote is
# closed and in place by now; only the standard streams need flushing.
logging.shutdown()
try:
    sys.stdout.flush()
    sys.stderr.flush()
except (OSError, ValueError):
    code = code or 1
os._exit(code)
