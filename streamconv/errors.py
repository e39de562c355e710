"""The one error hierarchy of streamconv.

Every error can name the file, the byte offset and the field path where the
problem was found; ``str(error)`` renders them as the single line the command
line prints.
"""

from __future__ import annotations

__all__ = [
    "ConversionError",
    "ExternalDataError",
    "Interrupted",
    "LimitError",
    "OutputError",
    "StreamconvError",
    "UsageError",
    "WireFormatError",
    "one_line",
]


class StreamconvError(Exception):
    """Base class: a problem with the input, the options or the output."""

    #: exit code the command line uses for this kind of error
    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        offset: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.offset = offset
        self.path = path

    def with_file(self, file: str) -> StreamconvError:
        """Return self after recording *file* if no file was named yet."""
        if self.file is None:
            self.file = file
        return self

    def __str__(self) -> str:
        where = []
        if self.offset is not None:
            where.append(f"byte {self.offset}")
        if self.path:
            where.append(self.path)
        text = ", ".join(where)
        text = f"{text}: {self.message}" if text else self.message
        text = f"{self.file}: {text}" if self.file else text
        # names come from the file: never let one split (or forge) the error line
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class WireFormatError(StreamconvError):
    """The bytes are not valid protobuf wire format (or not an ONNX model)."""


class LimitError(StreamconvError):
    """The input exceeds a safety limit (nesting depth, sizes)."""


class ExternalDataError(StreamconvError):
    """An external-data reference is missing, short, or points outside its folder."""


class ConversionError(StreamconvError):
    """onnx's converter cannot convert the model, or a payload went astray."""

    exit_code = 1


class OutputError(StreamconvError):
    """The output cannot be written (permissions, space, missing folder)."""


class UsageError(StreamconvError):
    """An option or argument is invalid."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def one_line(text: str) -> str:
    """*text* with control characters (newlines included) escaped, so it prints as one line.

    Names and strings come from the model and may hold anything.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
