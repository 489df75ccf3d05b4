"""The op graph: its printed text and DOT forms, operand order, copies, and inferred shapes."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import EXAMPLES, GOLDEN

import cnnc
from cnnc import ops
from cnnc.passes import Options, run_pipeline

LENET_TEXT = """\
graph lenet(%input : f32[N,1,28,28]) -> (%11) {
  %0 = conv2d[out=6 k=5 s=1 p=2](%input) : f32[N,6,28,28]
  %1 = sigmoid(%0) : f32[N,6,28,28]
  %2 = avgpool2d[k=2 s=2 p=0](%1) : f32[N,6,14,14]
  %3 = conv2d[out=16 k=5 s=1 p=0](%2) : f32[N,16,10,10]
  %4 = sigmoid(%3) : f32[N,16,10,10]
  %5 = avgpool2d[k=2 s=2 p=0](%4) : f32[N,16,5,5]
  %6 = flatten(%5) : f32[N,400]
  %7 = dense[units=120](%6) : f32[N,120]
  %8 = sigmoid(%7) : f32[N,120]
  %9 = dense[units=84](%8) : f32[N,84]
  %10 = sigmoid(%9) : f32[N,84]
  %11 = dense[units=10](%10) : f32[N,10]
}"""


def test_lenet_text() -> None:
    assert cnnc.load(EXAMPLES / "lenet.yaml").to_text() == LENET_TEXT


def test_lenet_shapes() -> None:
    graph = cnnc.load(EXAMPLES / "lenet.yaml")
    shapes = [graph.shape(name) for name in graph.order()]
    assert shapes == [(1, 28, 28), (6, 28, 28), (6, 28, 28), (6, 14, 14), (16, 10, 10),
                      (16, 10, 10), (16, 5, 5), (400,), (120,), (120,), (84,), (84,), (10,)]
    assert graph.outputs == ["11"]


def test_activation_shorthand_adds_a_node() -> None:
    graph = cnnc.load(GOLDEN / "lenet_named.yaml")
    assert graph.node_text("c1.sigmoid") == "%c1.sigmoid = sigmoid(%c1) : f32[N,6,28,28]"
    assert graph.operands("1") == ["c1.sigmoid"]
    assert graph.outputs == ["f3"]


def build(op: str, input_shape: tuple[int, ...], **attrs: object) -> cnnc.Graph:
    graph = cnnc.Graph("g", input_shape)
    graph.add("y", op, ["input"], ops.OPS[op].check_attrs(attrs))
    graph.outputs = ["y"]
    return graph


@pytest.mark.parametrize(
    ("op", "attrs", "text"),
    [
        ("conv2d", {"out_channels": 4, "kernel_size": [1, 2], "padding": [[0, 1], [2, 1]],
                    "stride": [2, 1], "bias": False},
         "%y = conv2d[out=4 k=1x2 s=2x1 p=0,1x2,1 bias=false](%input) : f32[N,4,5,10]"),
        ("conv2d", {"out_channels": 8, "kernel_size": 3, "padding": [2, 1], "dilation": 2,
                    "groups": 4},
         "%y = conv2d[out=8 k=3 s=1 p=2x1 d=2 g=4](%input) : f32[N,8,8,6]"),
        ("avgpool2d", {"kernel_size": 3, "stride": 2, "padding": 1, "ceil_mode": True,
                       "count_include_pad": False},
         "%y = avgpool2d[k=3 s=2 p=1 ceil_mode=true count_pad=false](%input) : f32[N,4,5,5]"),
        ("maxpool2d", {"kernel_size": 2}, "%y = maxpool2d[k=2 s=2 p=0](%input) : f32[N,4,4,4]"),
        ("batchnorm2d", {"eps": 0.001}, "%y = batchnorm2d[eps=0.001](%input) : f32[N,4,8,8]"),
        ("batchnorm2d", {}, "%y = batchnorm2d(%input) : f32[N,4,8,8]"),
        ("global_avgpool2d", {}, "%y = global_avgpool2d(%input) : f32[N,4,1,1]"),
        ("flatten", {}, "%y = flatten(%input) : f32[N,256]"),
    ],
)
def test_node_text(op: str, attrs: dict[str, object], text: str) -> None:
    assert build(op, (4, 8, 8), **attrs).node_text("y") == text


def test_dot() -> None:
    graph = cnnc.Graph("two ops", (1, 4, 4))
    graph.add("pool", "maxpool2d", ["input"], ops.OPS["maxpool2d"].check_attrs({"kernel_size": 2}))
    graph.add('say "hi"', "relu", ["pool"])
    graph.outputs = ['say "hi"']
    assert graph.to_dot() == "\n".join([
        'digraph "two ops" {',
        "  node [shape=box, fontname=monospace];",
        '  "input" [label="input\\ninput\\nf32[N,1,4,4]"];',
        '  "pool" [label="pool\\nmaxpool2d\\nf32[N,1,2,2]"];',
        '  "say \\"hi\\"" [label="say \\"hi\\"\\nrelu\\nf32[N,1,2,2]", style=bold];',
        '  "input" -> "pool";',
        '  "pool" -> "say \\"hi\\"";',
        "}",
    ])


def test_lenet_dot_has_every_node_and_edge() -> None:
    dot = cnnc.load(EXAMPLES / "lenet.yaml").to_dot()
    lines = dot.splitlines()
    assert lines[0] == 'digraph "lenet" {'
    assert '  "11" [label="11\\ndense\\nf32[N,10]", style=bold];' in lines
    assert sum("->" in line for line in lines) == 12


def join(op: str, operands: list[str]) -> cnnc.Graph:
    graph = cnnc.Graph("join", (2, 3, 3))
    graph.add("a", "relu", ["input"])
    graph.add("b", "tanh", ["input"])
    graph.add("y", op, operands)
    graph.outputs = ["y"]
    return graph


def test_operands_keep_their_order() -> None:
    assert join("concat", ["b", "a"]).operands("y") == ["b", "a"]
    assert join("concat", ["a", "b"]).operands("y") == ["a", "b"]
    assert join("concat", ["b", "a"]).shape("y") == (4, 3, 3)


def test_an_operand_used_twice_keeps_both_positions() -> None:
    graph = join("add", ["a", "b", "a"])
    assert graph.operands("y") == ["a", "b", "a"]
    assert graph.nx.edges["a", "y"]["index"] == [0, 2]
    assert graph.node_text("y") == "%y = add(%a, %b, %a) : f32[N,2,3,3]"


def test_users_and_order() -> None:
    graph = join("add", ["b", "a"])
    assert graph.users("input") == ["a", "b"]
    assert graph.users("a") == ["y"]
    assert graph.order() == ["input", "a", "b", "y"]
    assert list(graph) == graph.order()
    assert len(graph) == 4


def test_order_follows_data_flow_then_file_order() -> None:
    graph = cnnc.load(GOLDEN / "residual.yaml")
    assert graph.order() == ["input", "stem", "stem.relu", "a", "bn", "3", "b", "sum", "6",
                             "side", "cat", "9", "10", "11", "head"]
    assert graph.users("stem.relu") == ["a", "sum", "side"]


def test_copy_is_independent() -> None:
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    before = graph.to_text()
    weight = graph.params("0")["weight"].copy()
    other = graph.copy()
    other.attrs("0")["out_channels"] = 7
    other.params("0")["weight"] = np.zeros(1, np.float32)
    other.nx.edges["0", "1"]["index"].append(5)
    other.outputs.append("9")
    other.add("extra", "relu", ["11"])
    assert graph.to_text() == before
    assert graph.outputs == ["11"]
    assert graph.nx.edges["0", "1"]["index"] == [0]
    assert "extra" not in graph.nx
    np.testing.assert_array_equal(graph.params("0")["weight"], weight)


def test_copy_shares_nothing_it_prints() -> None:
    graph = cnnc.load(GOLDEN / "residual.yaml")
    assert graph.copy().to_text() == graph.to_text()
    assert graph.copy().to_dot() == graph.to_dot()


def test_add_refuses_operands_that_do_not_fit() -> None:
    graph = cnnc.Graph("g", (3, 8, 8))
    message = r"^expects a flat input \[features\], got \[3, 8, 8\]"
    with pytest.raises(ops.ShapeError, match=message):
        graph.add("d", "dense", ["input"], ops.OPS["dense"].check_attrs({"units": 2}))


def test_format_shape() -> None:
    from cnnc.graph import format_shape

    assert format_shape((16, 5, 5)) == "f32[N,16,5,5]"
    assert format_shape((10,), batch="3") == "f32[3,10]"


def test_replace_all_uses_moves_every_reader_and_output() -> None:
    graph = join("add", ["a", "b", "a"])
    graph.outputs = ["y", "a"]
    graph.replace_all_uses("a", "b")
    assert graph.node_text("y") == "%y = add(%b, %b, %b) : f32[N,2,3,3]"
    assert graph.nx.edges["b", "y"]["index"] == [0, 1, 2]
    assert graph.users("a") == [] and graph.outputs == ["y", "b"]


def test_erase_refuses_a_node_that_is_still_read() -> None:
    graph = join("add", ["a", "b"])
    with pytest.raises(ValueError, match=r"cannot erase %a: still read by %y$"):
        graph.erase("a")
    with pytest.raises(ValueError, match=r"cannot erase %y: still read by the outputs$"):
        graph.erase("y")
    with pytest.raises(ValueError, match="the graph's input cannot be erased"):
        graph.erase("input")
    graph.replace_all_uses("a", "b")
    graph.erase("a")
    assert graph.order() == ["input", "b", "y"]


def test_eliminate_dead_code_erases_what_no_output_depends_on() -> None:
    graph = join("add", ["a", "b"])
    graph.add("dead", "relu", ["a"])
    graph.add("deader", "tanh", ["dead"])
    graph.outputs = ["b"]
    assert graph.eliminate_dead_code() == ["a", "y", "dead", "deader"]
    assert graph.order() == ["input", "b"]
    assert graph.eliminate_dead_code() == []


def test_a_copy_has_a_plan_of_its_own() -> None:
    compiled = run_pipeline(cnnc.load(GOLDEN / "lenet.yaml"), Options())
    other = compiled.copy()
    assert other.plan == compiled.plan
    other.plan.groups[0].schedule = other.plan.groups[0].schedule.replace(oc_block=1)
    assert compiled.plan.groups[0].schedule.oc_block == 3


@pytest.mark.parametrize("target", ["llvm", "cuda-sim"])
def test_compiling_a_graph_without_outputs_says_so(target: str) -> None:
    graph = cnnc.Graph("no_outputs", (1, 4, 4))
    graph.add("act", "relu", ["input"])
    with pytest.raises(cnnc.ModelError) as raised:
        cnnc.compile(graph, target=target, use_cache=False)
    assert str(raised.value) == "model 'no_outputs' has no outputs: set Graph.outputs to the " \
        "nodes whose values it returns"
