"""The one rule for whether a computed result agrees with the reference.

`cnnc run --check`, the bench's check before timing, the fuzzer and the tuner's candidate check
all judge outputs here, so that they never disagree about what "close" means. NaN in the same
place on both sides agrees; so does the same infinity; anything else must be within
`RTOL`/`ATOL` of the reference, elementwise, as `numpy.testing.assert_allclose` demands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

RTOL, ATOL = 1e-4, 1e-5  # float32 agreement with the float64-accumulating reference


def bad_elements(got: np.ndarray, want: np.ndarray, slack: np.ndarray | float = 0.0,
                 rtol: float = RTOL, atol: float = ATOL) -> np.ndarray:
    """A boolean mask of where `got` disagrees with `want` (`slack` widens atol per element)."""
    got64 = np.asarray(got, dtype=np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    both_nan = np.isnan(got64) & np.isnan(want64)
    with np.errstate(invalid="ignore", over="ignore"):
        same_inf = np.isinf(want64) & (got64 == want64)
        close = np.abs(got64 - want64) <= atol + rtol * np.abs(want64) + slack
    finite = np.isfinite(got64) & np.isfinite(want64)
    return np.asarray(~(both_nan | same_inf | (finite & close)))


@dataclass(frozen=True)
class OutputCheck:
    """How one output compares with the reference's."""

    name: str
    ok: bool
    max_abs: float  # the largest |got - want| where both are finite
    bad: int  # how many elements disagree
    size: int
    first_bad: tuple[int, ...] | None  # the index of the first element that disagrees
    got_value: float | None = None
    want_value: float | None = None
    problem: str | None = None  # a shape or type that does not match, when there is one

    def describe(self) -> str:
        """One line for a user: what agrees, or where the first disagreement is."""
        if self.problem is not None:
            return f"output %{self.name}: {self.problem}"
        if self.ok:
            return f"output %{self.name}: ok (max abs error {self.max_abs:.3g})"
        return (f"output %{self.name}: {self.bad} of {self.size} values differ from the "
                f"reference (rtol={RTOL:g}, atol={ATOL:g}); first at {list(self.first_bad or ())}:"
                f" got {self.got_value!r}, expected {self.want_value!r}")


def check_output(name: str, got: Any, want: np.ndarray) -> OutputCheck:
    """Compare one output with the reference's answer `want`."""
    if not isinstance(got, np.ndarray) or got.shape != np.shape(want):
        shape = getattr(got, "shape", None)
        return OutputCheck(name, False, float("inf"), int(np.size(want)), int(np.size(want)),
                           None, problem=f"shape {shape}, expected {np.shape(want)}")
    bad = bad_elements(got, want)
    got64 = got.astype(np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(got64) & np.isfinite(want64)
        difference = np.where(finite, np.abs(got64 - want64), 0.0)
    max_abs = float(difference.max(initial=0.0))
    count = int(bad.sum())
    if not count:
        return OutputCheck(name, True, max_abs, 0, got.size, None)
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return OutputCheck(name, False, max_abs, count, got.size, where,
                       float(got64[where]), float(want64[where]))


def as_tuple(outputs: Any) -> tuple[Any, ...]:
    """A model's result as a tuple of outputs, whether it returned one array or several."""
    return outputs if isinstance(outputs, tuple) else (outputs,)


def check_outputs(got: Any, want: Any, names: list[str] | None = None) -> list[OutputCheck]:
    """Compare every output of a model's result with the reference's result."""
    gots, wants = as_tuple(got), as_tuple(want)
    names = names or [str(number) for number in range(len(wants))]
    if len(gots) != len(wants):
        return [OutputCheck(names[0] if names else "0", False, float("inf"), 0, 0, None,
                            problem=f"{len(gots)} outputs, expected {len(wants)}")]
    return [check_output(name, a, b) for name, a, b in zip(names, gots, wants)]


def agrees(got: Any, want: Any) -> bool:
    """True when every output of `got` agrees with the reference's `want`."""
    return all(check.ok for check in check_outputs(got, want))
