"""Group ops into kernels: a producer, the elementwise ops after it, a pooling, more
elementwise ops. `conv -> sigmoid -> avgpool` becomes one kernel that never stores the
full-size convolution output.

A node joins the group of its operand only when nothing else reads that operand and the
merge cannot create a cycle (torch.fx's partitioner rule). `flatten` is a view, not a kernel.
The groups, in launch order, are the plan's `groups` (`cnnc.plan`) for the later passes.
"""

from __future__ import annotations

import networkx as nx

from cnnc import ops
from cnnc.graph import INPUT, Graph
from cnnc.passes.layout import layout_of
from cnnc.passes.options import Options
from cnnc.plan import Group

VIEWS = ("flatten",)
__all__ = ["fuse", "is_view", "tensor_of", "unfused"]


def is_view(graph: Graph, name: str) -> bool:
    """Whether `name` costs nothing: a flatten is the same memory as its operand, except in
    the channel layout, where an image's channels are innermost; there only a dense layer
    reads the unflattened tensor directly, and anything else needs a flattening copy."""
    if name == INPUT or graph.op(name) not in VIEWS:
        return False
    if layout_of(graph).kind != "channel":
        return True
    return all(graph.op(user) == "dense" for user in graph.users(name)) and \
        name not in graph.outputs


def unfused(graph: Graph, options: Options) -> Graph:
    """The plain choice, one kernel per op but views: what stands in for `fuse` when it is off."""
    graph.plan.groups = _name([
        Group([name], window=name if ops.OPS[graph.op(name)].kind == "window" else None)
        for name in graph.order() if name != INPUT and not is_view(graph, name)
    ], graph)
    return graph


def fuse(graph: Graph, options: Options) -> Graph:
    if not options.fuse:
        return unfused(graph, options)
    group_of: dict[str, Group] = {}
    groups: list[Group] = []
    for name in graph.order():
        if name == INPUT or is_view(graph, name):
            continue
        group = _joinable_group(graph, name, group_of)
        if group is None:
            kind = ops.OPS[graph.op(name)].kind
            group = Group([name], window=name if kind == "window" else None)
            groups.append(group)
        else:
            group.nodes.append(name)
            if ops.OPS[graph.op(name)].kind == "window":
                group.window = name
        group_of[name] = group
    graph.plan.groups = _name(_in_launch_order(groups, group_of, graph), graph)
    return graph


def _in_launch_order(groups: list[Group], group_of: dict[str, Group], graph: Graph) -> list[Group]:
    """Groups ordered so that each runs after the groups whose results it reads."""
    index = {id(group): position for position, group in enumerate(groups)}
    depends = nx.DiGraph()
    depends.add_nodes_from(range(len(groups)))
    for group in groups:
        for node in group.nodes:
            for operand in graph.operands(node):
                source = group_of.get(tensor_of(graph, operand))
                if source is not None and source is not group:
                    depends.add_edge(index[id(source)], index[id(group)])
    return [groups[position] for position in nx.lexicographical_topological_sort(depends)]


def tensor_of(graph: Graph, name: str) -> str:
    """The node whose stored result `name` is: views share their operand's memory."""
    while is_view(graph, name):
        name = graph.operands(name)[0]
    return name


def _joinable_group(graph: Graph, name: str, group_of: dict[str, Group]) -> Group | None:
    """The group that `name` can join as its next op, or None."""
    kind = ops.OPS[graph.op(name)].kind
    if kind not in ("elementwise", "window"):
        return None
    operands = graph.operands(name)
    for position, operand in enumerate(operands):
        group = group_of.get(operand)
        if group is None or group.output != operand:
            continue
        if ops.OPS[graph.op(group.producer)].kind in ("opaque", "view"):
            continue  # softmax, concat and a flattening copy stay alone
        if len(graph.users(operand)) != 1 or operand in graph.outputs:
            continue  # someone else reads the value: it must be stored
        if kind == "window" and (group.window is not None or position != 0):
            continue  # one pooling per kernel
        if kind == "window" and _overlapping(graph, name) and \
                ops.OPS[graph.op(group.producer)].kind == "anchor":
            continue  # fused, each convolution point would be computed once per window
        if operands.count(operand) > 1:
            continue
        others = [other for other in operands if other != operand]
        # The other operands are read by the kernel, so they must exist before it runs:
        # none may depend on the group's result, or the merge would make a cycle.
        if any(nx.has_path(graph.nx, operand, other) for other in others):
            continue
        return group
    return None


def _overlapping(graph: Graph, name: str) -> bool:
    """Whether a pooling's windows overlap (a 3x3 window at stride 2): fused after a
    convolution, the kernel would compute the points the windows share several times over
    ((3/2)^2 = 2.25 times for 3x3 at stride 2; measured on the zoo's NiN at batch 64: its 1x1
    conv + 3x3/2 maxpool kernels ran at 37-56 GFLOP/s of useful work against 110-160 for
    the 1x1 convs alone)."""
    attrs = graph.attrs(name)
    if "kernel_size" not in attrs:
        return False  # a global pooling: one window
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    return kh > sh or kw > sw


def _name(groups: list[Group], graph: Graph) -> list[Group]:
    """Kernel names say what they fuse: `conv2d_sigmoid_avgpool2d_0`."""
    for index, group in enumerate(groups):
        group.name = "_".join([*(graph.op(node) for node in group.nodes), str(index)])
    return groups
