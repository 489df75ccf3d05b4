"""Small helpers that shape rules, passes, lowering and the backends share.

It imports nothing of cnnc, so that the op registry at the bottom of the import graph can use
it as well as a backend at the top.
"""

from __future__ import annotations


def ceil_div(numerator: int, denominator: int) -> int:
    """`numerator / denominator` rounded up, for a positive `denominator` (exact for any
    integers, unlike math.ceil on a float)."""
    return -(-numerator // denominator)
