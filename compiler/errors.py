"""The errors cnnc raises for a user's mistakes.

Every error a user can cause is one of these, with a message that names what is wrong and
where, so that the command line can print it alone instead of a traceback.
"""

from __future__ import annotations


class CnncError(Exception):
    """Base class of every error cnnc raises on purpose."""


class ModelError(CnncError, ValueError):
    """A model file, its layers or its weights are wrong.

    The message reads `FILE:LINE: layer 'NAME' (OP): what was expected`, leaving out the
    parts that are not known (a graph built in Python has no file or line).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        layer: str | None = None,
        op: str | None = None,
    ) -> None:
        self.reason = message
        self.file = file
        self.line = line
        self.layer = layer
        self.op = op
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file if self.line is None else f"{self.file}:{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        who = ""
        if self.layer is not None:
            who = f"layer '{self.layer}'" + (f" ({self.op})" if self.op else "")
        prefix = ": ".join(part for part in (where, who) if part)
        return f"{prefix}: {self.reason}" if prefix else self.reason


class CompileError(CnncError):
    """A backend failed to compile generated code; `log` holds what the tool said, and
    `line`/`source_line` the generated line it points at, where it names one."""

    def __init__(self, message: str, log: str = "", *, line: int | None = None,
                 source_line: str | None = None) -> None:
        self.log = log
        self.line = line
        self.source_line = source_line
        super().__init__(message if not log else f"{message}\n{log}")


class InputError(CnncError, ValueError):
    """An array passed to a model at call time has the wrong rank, shape or type."""


class DeviceError(CnncError, RuntimeError):
    """No GPU or driver to run on, or a kernel failed on the GPU or in the CUDA simulator."""


class BoundsError(CnncError, RuntimeError):
    """Generated code compiled with `check_bounds` tried to access memory out of bounds."""


class BatchMemoryError(InputError, MemoryError):
    """A call would need more memory than the machine has available; raised before any of
    it is allocated."""


class ScheduleError(CnncError, ValueError):
    """A schedule file or dict (`--schedule`) is malformed, or a field's value does not fit
    its kernel; the message reads `FILE:LINE: kernel 'NAME': what was expected`."""
