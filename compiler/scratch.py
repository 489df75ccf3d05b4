"""The memory a staged Winograd convolution keeps to itself (`cnnc.lower.winograd`): the
transformed input tiles V and their products M, a row of tiles (a strip) at a time. The
tiling pass sizes it (`Group.scratch`), the memory plan places it in the arena, and lowering
indexes it here, so that all three read one geometry.

Values are stored tile by tile with their channels innermost, so that the products' loop
over input channels walks consecutive floats. In the channel layout (one image a block) each
row of tiles has a strip of its own, so that batch 1 can share the rows among threads (the
strip is 2-50 KB); in the batch layout (16 images a value) one strip is reused and stays in
L2.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnc.graph import Graph
from cnnc.kernel import Expr
from cnnc.layouts import LANE, Layout
from cnnc.plan import Group


@dataclass(frozen=True)
class WinogradScratch:
    m: int  # output tile side: F(m x m, 3 x 3)
    tiles_h: int  # rows of tiles
    tiles_w: int  # tiles in a row
    strips: int  # rows of tiles with a strip of their own
    in_channels: int  # stored channel counts, lanes included in the channel layout
    out_channels: int
    lanes: int  # floats of one value: the batch layout's images, 1 in the channel layout

    @property
    def positions(self) -> int:
        """(m + 2)^2: the entries of one transformed tile."""
        return (self.m + 2) ** 2

    def _strip_floats(self, channels: int) -> int:
        return self.positions * self.tiles_w * channels * self.lanes

    @property
    def floats(self) -> int:
        return self.strips * (self._strip_floats(self.in_channels)
                              + self._strip_floats(self.out_channels))

    def transformed(self, strip: Expr, position: int | Expr, tile: Expr, channel: Expr) -> Expr:
        """Where entry `position` of input channel `channel`'s transformed tile is."""
        return self._index(0, self.in_channels, strip, position, tile, channel)

    def product(self, strip: Expr, position: int | Expr, tile: Expr, channel: Expr) -> Expr:
        """Where entry `position` of output channel `channel`'s summed products is."""
        base = self.strips * self._strip_floats(self.in_channels)
        return self._index(base, self.out_channels, strip, position, tile, channel)

    def _index(self, base: int, channels: int, strip: Expr, position: int | Expr, tile: Expr,
               channel: Expr) -> Expr:
        flat = ((strip * self.positions + position) * self.tiles_w + tile) * channels + channel
        if self.lanes > 1:
            flat = flat * self.lanes + LANE
        return flat + base if base else flat


def winograd_scratch(graph: Graph, group: Group, layout: Layout,
                     grid: tuple[int, int]) -> WinogradScratch:
    """The scratch of `group`'s kernel, a staged F(m x m, 3 x 3) (m: its schedule's) over
    `grid` (rows, columns of tiles, `tile.winograd_grid`) in `layout`."""
    one_image = layout.images_per_block == 1
    producer = group.producer
    in_channels = graph.shape(graph.operands(producer)[0])[0]
    return WinogradScratch(group.schedule.winograd, grid[0], grid[1],
                           grid[0] if one_image else 1, layout.channels(in_channels),
                           layout.channels(graph.shape(producer)[0]),
                           1 if one_image else layout.vector_width)


__all__ = ["WinogradScratch", "winograd_scratch"]
