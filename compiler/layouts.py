"""The memory layouts of the tensors between kernels, one class per layout: where a point of
a tensor is stored (`index`), how many floats a block holds (`floats`), how channels are
padded (`channels`), and how weights are packed to match. Lowering and the passes ask them;
they know nothing of ops or passes.

Two words for two things: a layout's `vector_width` is the lanes of one vector; its
`images_per_block` is how many images one call of a kernel computes side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from cnnc.kernel import Const, Expr, Select, Var, less
from cnnc.util import ceil_div

LayoutKind = Literal["batch", "channel"]
LANE = Var("lane")
HALF_VECTOR = 8

Shape = tuple[int, ...]


def _row_major(shape: Shape, coords: list[Expr]) -> Expr:
    flat = coords[0]
    for dim, coord in zip(shape[1:], coords[1:]):
        flat = flat * dim + coord
    return flat


@dataclass(frozen=True)
class Layout:
    """What every layout answers; `BatchLayout` and `ChannelLayout` are the two there are."""

    vector_width: int
    kind: ClassVar[LayoutKind]

    @property
    def images_per_block(self) -> int:
        raise NotImplementedError

    def vector(self, count: int) -> int:
        """The vector width for a tensor of `count` channels."""
        return self.vector_width

    def channels(self, count: int) -> int:
        """The stored channel count of a tensor of `count` channels."""
        return count

    def floats(self, shape: Shape) -> int:
        """Floats per block of a tensor of per-image `shape`."""
        raise NotImplementedError

    def index(self, shape: Shape, coords: list[Expr]) -> Expr:
        """Where point `coords` (channel first) of the current image is stored."""
        raise NotImplementedError

    def channel_steps(self, count: int) -> int:
        """Iterations of a kernel's channel loop over `count` output channels."""
        raise NotImplementedError

    def tile_channels(self, step: Expr, block: int, width: int) -> list[Expr]:
        """The channel coordinates of a register tile of `block` steps at loop step `step`."""
        raise NotImplementedError

    def conv_weights(self, weight: np.ndarray) -> np.ndarray:
        """A conv2d weight [out][in / groups][kh][kw] as the kernel reads it."""
        raise NotImplementedError

    def conv_weight_index(self, shape: tuple[int, int, int, int], channel: Expr, ic: Expr,
                          ky: Expr, kx: Expr) -> Expr:
        """Where tap (ic, ky, kx) of output `channel` is in `conv_weights` of a weight of
        `shape`."""
        raise NotImplementedError

    def tile_straddles_group(self, count: int, groups: int, block: int) -> bool:
        """Whether a tile of `block` channel steps may hold channels of two conv groups
        (of `count` channels in all), which one load per tap could not serve."""
        return False

    def tap_channels(self, channels: list[Expr], groups: int, in_channels: int,
                     out_channels: int) -> list[Expr]:
        """The output channels whose group picks the input channel a conv tap reads: one
        for the whole tile, or one per channel where channels of the tile may be in
        different groups."""
        return channels[:1]


@dataclass(frozen=True)
class BatchLayout(Layout):
    """`[C][H][W][images]`: the images of one batch block side by side, one lane each. Every
    op runs the same instruction stream on all lanes; best when there are many images."""

    kind: ClassVar[LayoutKind] = "batch"

    @property
    def images_per_block(self) -> int:
        return self.vector_width

    def floats(self, shape: Shape) -> int:
        return math.prod(shape) * self.vector_width

    def index(self, shape: Shape, coords: list[Expr]) -> Expr:
        """The current image is the lane."""
        flat = _row_major(shape, coords)
        return flat * self.vector_width + LANE if self.vector_width > 1 else flat + LANE

    def channel_steps(self, count: int) -> int:
        return count

    def tile_channels(self, step: Expr, block: int, width: int) -> list[Expr]:
        return [step * block + j for j in range(block)]

    def conv_weights(self, weight: np.ndarray) -> np.ndarray:
        return weight

    def conv_weight_index(self, shape: tuple[int, int, int, int], channel: Expr, ic: Expr,
                          ky: Expr, kx: Expr) -> Expr:
        _, per_group_in, kh, kw = shape
        return ((channel * per_group_in + ic) * kh + ky) * kw + kx

    def tile_straddles_group(self, count: int, groups: int, block: int) -> bool:
        """One load of an input channel serves the whole tile, so the tile must stay in one
        group; a depthwise tile loads per channel instead (`tap_channels`)."""
        return groups != count and (count // groups) % block != 0

    def tap_channels(self, channels: list[Expr], groups: int, in_channels: int,
                     out_channels: int) -> list[Expr]:
        """In a depthwise convolution (one output channel a group) every channel of the tile
        reads an input channel of its own."""
        return list(channels) if groups == out_channels > 1 else channels[:1]


@dataclass(frozen=True)
class ChannelLayout(Layout):
    """One image per block, `[H][W][C']` with the channels padded to whole vectors, each
    vector holding `vector_width` channels of one pixel; best for one or a few images."""

    kind: ClassVar[LayoutKind] = "channel"

    @property
    def images_per_block(self) -> int:
        return 1

    def vector(self, count: int) -> int:
        """A few channels take half-width vectors: on our CPUs a 16-lane operation costs two
        8-lane ones, so 6 channels in 8 lanes run twice as fast as in 16."""
        if count <= HALF_VECTOR < self.vector_width:
            return HALF_VECTOR
        return self.vector_width

    def channels(self, count: int) -> int:
        width = self.vector(count)
        return ceil_div(count, width) * width

    def floats(self, shape: Shape) -> int:
        return self.channels(shape[0]) * math.prod(shape[1:])

    def index(self, shape: Shape, coords: list[Expr]) -> Expr:
        """The lane is part of the channel coordinate that the caller passes."""
        pixel: Expr | int = 0
        for dim, coord in zip(shape[1:], coords[1:]):
            pixel = pixel * dim + coord
        return pixel * self.channels(shape[0]) + coords[0]

    def channel_steps(self, count: int) -> int:
        """One step per vector of channels."""
        return self.channels(count) // self.vector(count)

    def tile_channels(self, step: Expr, block: int, width: int) -> list[Expr]:
        return [(step * block + j) * width + LANE for j in range(block)]

    def conv_weights(self, weight: np.ndarray) -> np.ndarray:
        """[ic][ky][kx][channels]: one vector load gives a tap for a vector of channels."""
        out_channels, per_group_in, kh, kw = weight.shape
        packed = np.zeros((per_group_in, kh, kw, self.channels(out_channels)))
        packed[..., :out_channels] = weight.transpose(1, 2, 3, 0)
        return packed

    def conv_weight_index(self, shape: tuple[int, int, int, int], channel: Expr, ic: Expr,
                          ky: Expr, kx: Expr) -> Expr:
        out_channels, _, kh, kw = shape
        return ((ic * kh + ky) * kw + kx) * self.channels(out_channels) + channel

    def tap_channels(self, channels: list[Expr], groups: int, in_channels: int,
                     out_channels: int) -> list[Expr]:
        """Each lane may be in a group of its own; padding lanes read a real group's input,
        not past it. One output channel a group (depthwise) reads the input channel of the
        same number, and the input's padding lanes are as many: the index stays
        consecutive in the lanes, one vector load instead of a lane-by-lane gather (what a
        padding lane reads meets a zero weight and stays in a padding lane)."""
        if groups == 1:
            return channels[:1]
        if groups == in_channels == out_channels:
            return list(channels)
        return [Select(less(channel, out_channels), channel, Const(out_channels - 1))
                for channel in channels]


LAYOUTS: dict[str, type[Layout]] = {"batch": BatchLayout, "channel": ChannelLayout}
