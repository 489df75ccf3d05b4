"""Schedule files (`--schedule FILE`, and what `cnnc tune` writes): read, and every field checked.

Reading checks the file's form and each field's name and type. Whether a value fits the
kernel it is for (`oc_block` at most the kernel's output channels) and whether every kernel
the file names exists can only be checked where the kernels are known: the tiling pass calls
`check_fits` and `check_names`. Each mistake is one `ScheduleError` line naming the file, the
line, the kernel and the field. This module applies nothing and never looks at a graph.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnc.errors import ScheduleError
from cnnc.version import __version__

# Fields older versions wrote (the layout decides the vector width, and threads always split
# the batch blocks): a file that has them still loads; they are ignored with a warning.
RETIRED_FIELDS = ("lanes", "parallel")
INTEGER_FIELDS = ("oc_block", "x_block", "unroll_max", "gpu_threads", "winograd")
WINOGRAD_TILES = (0, 2, 4)  # off, F(2x2,3x3), F(4x4,3x3): `cnnc.lower.winograd`
BOOLEAN_FIELDS = ("gpu_batch_inner", "gpu_shared_tiles")
MAX_GPU_THREADS = 1024  # threads per block on every CUDA architecture
EVERY_KERNEL = "*"

_SHOWN: dict[Any, Any] = {}  # warnings already shown in this process (two layouts, one file)


class ScheduleWarning(UserWarning):
    """Part of a schedule file is ignored: records tuned elsewhere, or retired fields."""


@dataclass(frozen=True)
class Override:
    """Schedule fields for one kernel (`kernel`, or "*" for every kernel) and where they were
    written. A tuned record also carries its kernel's `signature` (it then applies to exactly
    that kernel) and, when it says so, the `model` it was tuned for."""

    kernel: str
    fields: dict[str, Any]
    file: str | None = None
    line: int | None = None
    signature: str | None = None
    model: str | None = None

    def key(self) -> str:
        return self.signature or self.kernel

    def who(self) -> str:
        return "every kernel ('*')" if self.kernel == EVERY_KERNEL else f"kernel '{self.kernel}'"

    def where(self) -> str:
        """`FILE:LINE: kernel 'NAME'`, the prefix of every error about this override."""
        return f"{_place(self)}{self.who()}"


@dataclass(frozen=True)
class KernelFacts:
    """What bounds a kernel's schedule: its output channels where it computes them (a
    convolution or dense layer; None otherwise) and the width of its output rows (None when
    its output has no rows), and the Winograd tiles that apply to it."""

    name: str
    channels: int | None
    row: int | None
    winograd: tuple[int, ...] = ()  # the `winograd` tiles that can compute it


class Schedules(dict[str, dict[str, Any]]):
    """Fields by key (a kernel's name, "*" or a tuned record's signature), as the tiling pass
    applies them: a later line for the same key wins. `overrides` keeps every line, with
    where it was written, so that each is checked against its kernel."""

    def __init__(self, overrides: Iterable[Override] = ()) -> None:
        super().__init__()
        self.overrides = list(overrides)
        for override in self.overrides:
            self[override.key()] = override.fields

    def lines_for(self, key: str) -> list[Override]:
        return [override for override in self.overrides if override.key() == key]


@dataclass
class _Skipped:
    """Records of a tuned file that are not applied, counted for one warning."""

    count: int = 0
    first_line: int = 0


def read_schedules(source: str | Path | Mapping[str, Any] | None,
                   model: str | None = None) -> Schedules:
    """Schedule overrides from a dict, a file holding a JSON object {kernel: {field: value}}
    or JSON lines {"kernel", "signature", "schedule", "cpu", "cnnc", "model"} (what `cnnc
    tune` writes); "*" applies to every kernel. Tuned records for another CPU, cnnc version
    or model (`model`, the name of the one being compiled) are skipped with a warning."""
    if source is None:
        return Schedules()
    if isinstance(source, Schedules):
        return source
    if isinstance(source, Mapping):
        return Schedules([_override(str(name), fields, None, None)
                          for name, fields in source.items()])
    name = str(source)
    try:
        text = Path(source).read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ScheduleError(f"cannot read the schedule file '{name}': {reason}") from None
    lines = text.splitlines()
    first = next((number for number, line in enumerate(lines, 1) if line.strip()), 0)
    try:
        data = json.loads(text) if first else {}
    except json.JSONDecodeError as whole:
        try:
            json.loads(lines[first - 1])
        except json.JSONDecodeError:  # not JSON lines either: report the document's error
            raise ScheduleError(f"{name}:{whole.lineno}: not valid JSON: {whole.msg}") from None
        return _read_records(name, lines, model)
    if isinstance(data, dict) and "schedule" not in data:  # not one tuner record
        return Schedules([_override(str(kernel), fields, name, _line_of(lines, str(kernel)))
                          for kernel, fields in data.items()])
    return _read_records(name, lines, model)


def as_schedules(schedules: Mapping[str, Any]) -> Schedules:
    """`schedules` as read by `read_schedules` (a plain dict is read, and so checked)."""
    return schedules if isinstance(schedules, Schedules) else read_schedules(schedules)


def check_fits(override: Override, kernel: KernelFacts | None) -> None:
    """Refuse a field whose value does not fit `kernel` (None: "*", any kernel)."""
    for name, value in override.fields.items():
        if name == "winograd" and kernel is not None and value and value not in kernel.winograd:
            applies = " or ".join(map(str, kernel.winograd))
            raise ScheduleError(
                f"{override.where()}: 'winograd' must be 0" + (f" or {applies}" if applies
                else " (Winograd computes only a 3x3 stride-1 undilated ungrouped conv2d, "
                "whose fused pooling window, if any, tiles its output)") + f", got {value!r}")
        if name not in ("oc_block", "x_block"):
            continue  # their ranges do not depend on the kernel: checked when read
        limit = None if kernel is None else kernel.channels if name == "oc_block" \
            else kernel.row
        if kernel is not None and limit is None:
            if value != 1:
                what = "no convolution or dense layer" if name == "oc_block" \
                    else "an output without rows"
                raise ScheduleError(f"{override.where()}: '{name}' must be 1 for a kernel "
                                    f"with {what}, got {value!r}")
        elif value < 1 or (limit is not None and value > limit):
            bound = f"from 1 to {limit}" if limit is not None else ">= 1"
            raise ScheduleError(f"{override.where()}: '{name}' must be an integer {bound}, "
                                f"got {value!r}")


def check_names(schedules: Schedules, kernels: list[KernelFacts], signatures: set[str],
                layout: str, model: str) -> None:
    """Refuse a kernel name that is not one of `kernels`; warn about a tuned record for
    `layout` whose signature matches none of them (tuned for another model, or before the
    model changed)."""
    names = [kernel.name for kernel in kernels]
    for override in schedules.overrides:
        if override.kernel == EVERY_KERNEL:
            continue
        if override.signature is None:
            if override.kernel not in names:
                raise ScheduleError(f"{_place(override)}no kernel '{override.kernel}' in model "
                                    f"'{model}'; its kernels: {', '.join(names)}")
            continue
        if not override.signature.startswith(f"{layout}/") or override.signature in signatures:
            continue
        if override.kernel in names:
            reason = (f"kernel '{override.kernel}' of model '{model}' has changed since it "
                      "was tuned (its ops, attributes or shapes differ); the record is "
                      "ignored: tune again")
        else:
            reason = (f"kernel '{override.kernel}' is not in model '{model}' (the record was "
                      f"tuned for another model); ignored. Its kernels: {', '.join(names)}")
        _warn(reason, override.file, override.line)


def _read_records(name: str, lines: list[str], model: str | None) -> Schedules:
    overrides = []
    skipped: dict[str, _Skipped] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kernel = str(record["kernel"])
            fields = record["schedule"]
        except json.JSONDecodeError as error:
            raise ScheduleError(f"{name}:{number}: not valid JSON: {error.msg}") from None
        except (KeyError, TypeError):
            raise ScheduleError(f"{name}:{number}: not a schedule record: expected a JSON "
                                'object with "kernel" and "schedule"') from None
        override = _override(kernel, fields, name, number, record.get("signature"),
                             record.get("model"))
        why = _not_for_here(record, model)
        if why is None:
            overrides.append(override)
            continue
        group = skipped.setdefault(why, _Skipped(first_line=number))
        group.count += 1
    for why, group in skipped.items():
        records = "record was" if group.count == 1 else f"{group.count} records were"
        _warn(f"{records} tuned {why}; ignored", name, group.first_line)
    return Schedules(overrides)


def _not_for_here(record: dict[str, Any], model: str | None) -> str | None:
    """Why a tuned record does not hold here, or None: it holds for the CPU, the cnnc and
    the model it was measured with."""
    if record.get("model") is not None and model is not None and record["model"] != model:
        return f"for model '{record['model']}', not '{model}'"
    if record.get("cnnc") not in (None, __version__):
        return f"with cnnc {record['cnnc']}, not {__version__}"
    if record.get("cpu") is not None:
        from cnnc.target import llvm_cpu_name

        if record["cpu"] != llvm_cpu_name():
            return f"on CPU '{record['cpu']}', not '{llvm_cpu_name()}'"
    return None


def _override(kernel: str, fields: Any, file: str | None, line: int | None,
              signature: Any = None, model: Any = None) -> Override:
    place = Override(kernel, {}, file, line)
    if not isinstance(fields, Mapping):
        raise ScheduleError(f"{place.where()}: the schedule must be a JSON object of "
                            f"fields, got {_shown(fields)}")
    checked: dict[str, Any] = {}
    unknown = []
    for name, value in fields.items():
        if name in RETIRED_FIELDS:
            _warn(f"{place.who()}: '{name}' is no longer a schedule field (the layout and the "
                  "thread pool decide it); ignored", file, line)
        elif name in INTEGER_FIELDS:
            checked[name] = _integer(place, name, value)
        elif name in BOOLEAN_FIELDS:
            if not isinstance(value, bool):
                raise ScheduleError(f"{place.where()}: '{name}' must be true or false, got "
                                    f"{_shown(value)}")
            checked[name] = value
        else:
            unknown.append(str(name))
    if unknown:
        known = sorted((*INTEGER_FIELDS, *BOOLEAN_FIELDS))
        raise ScheduleError(f"{place.where()}: unknown schedule fields {sorted(unknown)}; "
                            f"known: {known}")
    return Override(kernel, checked, file, line,
                    str(signature) if signature is not None else None,
                    str(model) if model is not None else None)


def _integer(place: Override, name: str, value: Any) -> int:
    """`value` as a field that must be an integer: its type now, and for the fields whose
    range does not depend on the kernel, its range too."""
    bounds = {"oc_block": "from 1 to the kernel's output channels",
              "x_block": "from 1 to the width of the kernel's output rows",
              "unroll_max": ">= 0", "gpu_threads": f"from 1 to {MAX_GPU_THREADS}",
              "winograd": "0 (off), 2 or 4 (the output tile of F(m x m, 3 x 3))"}
    fits = isinstance(value, int) and not isinstance(value, bool)
    if fits and name == "winograd":
        fits = value in WINOGRAD_TILES
    elif fits and name == "unroll_max":
        fits = value >= 0
    elif fits and name == "gpu_threads":
        fits = 1 <= value <= MAX_GPU_THREADS
    if not fits:
        raise ScheduleError(f"{place.where()}: '{name}' must be an integer {bounds[name]}, got "
                            f"{_shown(value)}")
    return int(value)


def _place(override: Override) -> str:
    if override.file is None:
        return ""
    return f"{override.file}:{override.line}: " if override.line else f"{override.file}: "


def _shown(value: Any) -> str:
    """A value as the user wrote it in JSON ("x", 2.5, null), else its Python form."""
    return json.dumps(value) if _jsonable(value) else repr(value)


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _line_of(lines: list[str], kernel: str) -> int | None:
    """The line of a JSON object's file where `kernel`'s key is written."""
    key = json.dumps(kernel)
    return next((number for number, line in enumerate(lines, 1) if key in line), None)


def _warn(message: str, file: str | None, line: int | None) -> None:
    """Warn as `FILE:LINE: ScheduleWarning: message`, each message once per process."""
    warnings.warn_explicit(message, ScheduleWarning, file or "<schedule>", line or 0,
                           registry=_SHOWN)
