"""Choices a model makes by timing its own code when it is built, where an estimate from the
peak and the barrier is not enough: whether batch 1 runs split on the pool, and which layout
runs large batches. Both layouts and the split kernels are compiled anyway; only the
choice is made here. Nothing here knows a model's file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

TIMING_SECONDS = 0.03  # about what timing one choice may take, past its warm-up
TIMING_MIN_CALLS, TIMING_MAX_CALLS = 3, 25  # calls each way


def time_calls(first: Callable[[], None], second: Callable[[], None]) -> tuple[float, float]:
    """The fastest of a few interleaved calls of each, in seconds (the fastest, as the peak
    keeps the fastest run: what the code costs when nothing else takes the core)."""
    for call in (first, second, first, second):  # warm the caches and the pool's workers
        call()
    start = time.perf_counter()
    first()
    second()
    pair = time.perf_counter() - start
    best = [math.inf, math.inf]
    for _ in range(max(TIMING_MIN_CALLS, min(TIMING_MAX_CALLS, int(TIMING_SECONDS / pair)))):
        for which, call in enumerate((first, second)):
            start = time.perf_counter()
            call()
            best[which] = min(best[which], time.perf_counter() - start)
    return best[0], best[1]


def channel_over_batch(channel_block: Callable[[], None],
                       batch_block: Callable[[], None]) -> float:
    """The time of one batch block's images in the channel layout, one image a block, over
    their time as one block of the batch layout. The batch layout does the same work on 16
    images at once, but its tensors are 16 times an image's: where those overflow the
    core's caches (NiN's 1x1 convolutions, MobileNet's), one image at a time is faster."""
    channel_seconds, batch_seconds = time_calls(channel_block, batch_block)
    return channel_seconds / batch_seconds


__all__ = ["channel_over_batch", "time_calls"]
