"""The kernel IR's traversal layer (children, walk, rewrite, substitute), its verifier and its
C-style printers: the order a walk visits nodes in, what a rewrite shares and rebuilds, that
every lowered golden kernel verifies and that each rule catches the kernel that breaks it,
and how constants print in the IR's text and in CUDA C."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from conftest import GOLDEN

import cnnc
from cnnc import lower as lower_module
from cnnc.backends.cuda.codegen import CudaPrinter
from cnnc.kernel import (
    LOOP_KINDS,
    Assign,
    Bin,
    Buffer,
    Call,
    Const,
    CStylePrinter,
    Declare,
    Expr,
    For,
    If,
    Kernel,
    Load,
    Local,
    Node,
    Select,
    Stmt,
    Store,
    Var,
    children,
    less,
    maximum,
    rewrite,
    substitute,
    walk,
)
from cnnc.lower import lower
from cnnc.passes import Options, run_pipeline
from cnnc.verify import IRError, verify

ROW, LANE = Var("i"), Var("lane")


def text(expr: Expr) -> str:
    return CStylePrinter().expr(expr)


def copy_loop() -> For:
    """for i < 4: out[i * 2 + lane] = in0[i] * 2.0, inside a lane loop."""
    store = Store("out", ROW * 2 + LANE, Load("in0", ROW) * 2.0)
    return For("i", 4, [For("lane", 2, [store], "vectorized", role="lane")], role="spatial")


def test_children_are_the_parts_in_evaluation_order() -> None:
    load = Load("in0", ROW)
    cond = less(ROW, 3)
    store = Store("out", ROW, load)
    branch = If(cond, [store])
    assert children(Bin("+", ROW, load)) == [ROW, load]
    assert children(Select(cond, load, Const(0.0)))[0] is cond
    assert children(branch) == [cond, store]
    assert children(For("i", 4, [branch])) == [branch]
    assert children(ROW) == [] and children(Const(1.0)) == []
    with pytest.raises(TypeError, match="not a kernel IR node"):
        children("i")  # type: ignore[arg-type]


def test_walk_visits_every_part_before_its_node_left_to_right() -> None:
    loop = copy_loop()
    lane_loop = loop.body[0]
    assert isinstance(lane_loop, For)
    store = lane_loop.body[0]
    assert isinstance(store, Store)
    index, value = store.index, store.value
    assert isinstance(index, Bin) and isinstance(value, Bin)
    assert isinstance(index.left, Bin) and isinstance(value.left, Load)
    expected: list[Node] = [
        index.left.left, index.left.right, index.left, index.right, index,  # i * 2 + lane
        value.left.index, value.left, value.right, value,  # in0[i] * 2.0
        store, lane_loop, loop,
    ]
    got = list(walk(loop))
    assert [id(node) for node in got] == [id(node) for node in expected]
    assert [id(node) for node in walk([loop, loop])] == [id(node) for node in expected * 2]


def test_walk_without_expressions_visits_only_the_statements() -> None:
    loop = copy_loop()
    assert [type(node).__name__ for node in walk(loop, expressions=False)] == [
        "Store", "For", "For"]


def test_substitute_replaces_a_variable_and_refolds_the_integer_arithmetic() -> None:
    index = Var("x") * 4 + LANE
    assert text(substitute(index, {"lane": Const(0)})) == "x * 4"
    assert text(substitute(index, {"lane": Var("y") + 1})) == "x * 4 + (y + 1)"
    assert text(index) == "x * 4 + lane"  # the original is never edited
    # 0 * NaN is not 0: float arithmetic stays as it is.
    assert text(substitute(Load("in0", LANE) * 0.0, {"lane": Const(0)})) == "in0[0] * 0.0f"


def test_substitute_in_statements_rebuilds_only_what_changes() -> None:
    loop = copy_loop()
    inner = loop.body[0]
    assert isinstance(inner, For)
    untouched = Store("out", Const(0), Const(1.0))
    loop.body.append(untouched)
    result = substitute(loop, {"lane": Const(0)})
    assert CStylePrinter().block([result], 0) == [
        "for (i = 0; i < 4; i++) {",
        "  for (lane = 0; lane < 2; lane++) {  // vectorized",
        "    out[i * 2] = in0[i] * 2.0f;",
        "  }",
        "  out[0] = 1.0f;",
        "}",
    ]
    assert result is not loop and result.body[1] is untouched
    assert CStylePrinter().block([inner], 0)[1] == "  out[i * 2 + lane] = in0[i] * 2.0f;"


def test_rewrite_goes_bottom_up_and_shares_what_nothing_changed() -> None:
    expr = maximum(Load("in0", ROW + 1), Const(0.0))
    seen: list[str] = []

    def rename(node: Node) -> Node | None:
        seen.append(type(node).__name__)
        if isinstance(node, Var) and node.name == "i":
            return Var("j")
        if isinstance(node, Load):
            assert text(node.index) == "j + 1"  # its parts were rewritten first
        return None

    renamed = rewrite(expr, rename)
    assert seen == ["Var", "Const", "Bin", "Load", "Const", "Bin"]
    assert text(renamed) == "max(in0[j + 1], 0.0f)"
    assert isinstance(renamed, Bin) and renamed.right is expr.right
    assert rewrite(expr, lambda node: None) is expr


# --- verify ----------------------------------------------------------------------------------


def kernel_of(body: list[Stmt], *extra: Buffer, uses_batch: bool = False) -> Kernel:
    buffers = [Buffer("in0", 8, "input"), Buffer("p0", 2, "param", np.ones(2, np.float32)),
               Buffer("out", 8, "output"), *extra]
    return Kernel("k", ["layer"], buffers, body, uses_batch=uses_batch)


def good_body() -> list[Stmt]:
    """A kernel that keeps every rule: the broken ones below each change one thing."""
    return [For("i", 8, [
        Declare("acc", Load("p0", Const(0))),
        If(Bin("and", less(Const(-1), ROW), less(ROW, 8)), [
            Assign("acc", Local("acc") + Select(less(ROW, 4), Load("in0", ROW), Const(0.0))),
        ]),
        Store("out", ROW, Call("exp", Local("acc"))),
    ], "unrolled", role="spatial")]


def test_a_kernel_that_keeps_the_rules_verifies() -> None:
    verify(kernel_of(good_body()))
    verify(kernel_of([Store("out", Var("block"), Const(0.0))], uses_batch=True))


@pytest.mark.parametrize("case", ["lenet", "residual", "multi_in_out", "avgpool_pad",
                                  "depthwise_dilated", "asym_padding"])
@pytest.mark.parametrize("target,layout", [("llvm", "batch"), ("llvm", "channel"),
                                           ("cuda-sim", "batch")])
def test_every_lowered_golden_kernel_verifies(case: str, target: str, layout: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    compiled = run_pipeline(graph, Options(target=target, layout=layout, arch="sm_90"), (),
                            None)
    for kernel in lower(compiled).kernels:
        verify(kernel)


def test_lowering_verifies_its_kernels_when_cnnc_verify_is_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    monkeypatch.setattr(lower_module, "verify", lambda kernel: checked.append(kernel.name))
    graph = cnnc.load(GOLDEN / "lenet.yaml")
    compiled = run_pipeline(graph, Options(layout="batch"), (), None)
    monkeypatch.setenv("CNNC_VERIFY", "1")
    kernels = [kernel.name for kernel in lower(compiled).kernels]
    assert checked == kernels and len(kernels) == 7  # pack, 5 groups, unpack
    checked.clear()
    monkeypatch.setenv("CNNC_VERIFY", "0")
    lower(compiled)
    assert checked == []


def at(position: int, stmt: Stmt) -> Callable[[list[Stmt]], None]:
    """An edit of `good_body()`: its loop's statement at `position` becomes `stmt`."""
    def edit(body: list[Stmt]) -> None:
        loop = body[0]
        assert isinstance(loop, For)
        loop.body[position] = stmt
    return edit


def set_loop(**changes: object) -> Callable[[list[Stmt]], None]:
    def edit(body: list[Stmt]) -> None:
        for name, value in changes.items():
            setattr(body[0], name, value)
    return edit


BROKEN: dict[str, tuple[Callable[[list[Stmt]], None], str]] = {
    "unbound variable": (at(2, Store("out", Var("j"), Const(0.0))),
                         "variable j is not bound by a loop around it"),
    "batch variable in a kernel without the batch": (
        at(2, Store("out", Var("batch"), Const(0.0))), "variable batch is not bound"),
    "load of an output": (at(2, Store("out", ROW, Load("out", ROW))),
                          "a load reads out, an output buffer"),
    "load of no buffer": (at(2, Store("out", ROW, Load("in9", ROW))),
                          "a load reads in9, which is no buffer"),
    "store to an input": (at(2, Store("in0", ROW, Const(0.0))),
                          "a store writes in0, an input buffer"),
    "float index": (at(2, Store("out", ROW, Load("in0", Const(1.0)))),
                    "the index into in0 is a float"),
    "int stored": (at(2, Store("out", ROW, ROW + 0)), "the value stored in out is an int, not a "
                                                  "float: i"),
    "local read before it is declared": (at(2, Store("out", ROW, Local("t"))),
                                         "local t is read before it is declared"),
    "local assigned before it is declared": (at(2, Assign("t", Const(1.0))),
                                             "local t is assigned before it is declared"),
    "local declared twice": (at(2, Declare("acc", Const(1.0))), "local acc is declared twice"),
    "outer local read in an inner block": (  # allowed: the control case for the next
        at(2, If(less(ROW, 2), [Declare("t", Const(1.0)), Store("out", ROW, Local("acc"))])), ""),
    "local read after its block ended": (
        lambda body: body.append(Store("out", Const(0), Local("acc"))),
        "local acc is read before it is declared"),
    "a loop rebinding its variable": (at(2, For("i", 2, [], role="spatial")),
                                      "a loop rebinds i"),
    "unknown loop kind": (set_loop(kind="parallel"), "loop i has kind 'parallel'"),
    "empty loop": (set_loop(extent=0), "loop i has extent 0"),
    "or": (at(1, If(Bin("or", less(ROW, 1), less(ROW, 2)), [])),
           "'or' of a condition and a condition"),
    "int and float added": (at(2, Store("out", ROW, Local("acc") + ROW)),
                            "'+' of a float and an int"),
    "int compared with float": (at(1, If(Bin("<", Local("acc"), ROW), [])),
                                "'<' of a float and an int"),
    "if on a number": (at(1, If(ROW + 0, [])), "an if's test is an int, not a condition"),
    "unknown function": (at(2, Store("out", ROW, Call("tanh", Local("acc")))), "tanh of a float"),
    "name clash": (at(1, Declare("in0", Const(0.0))), "local in0 has the name of a buffer"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_verify_names_the_broken_rule(name: str) -> None:
    edit, message = BROKEN[name]
    body = good_body()
    edit(body)
    if not message:
        verify(kernel_of(body))
        return
    with pytest.raises(IRError) as error:
        verify(kernel_of(body))
    assert str(error.value).startswith("kernel k: ")
    assert message in str(error.value)


@pytest.mark.parametrize("buffer,message", [
    (Buffer("out", 4, "output"), "two buffers are named out"),
    (Buffer("p1", 2, "param"), "param buffer p1 lacks data"),
    (Buffer("in1", 2, "input", np.ones(2, np.float32)), "input buffer in1 carries data"),
    (Buffer("p1", 3, "param", np.ones(2, np.float32)), "parameter p1 holds 2 floats, not 3"),
    (Buffer("in1", 0, "input"), "buffer in1 has size 0"),
    (Buffer("tmp", 2, "temp"), "buffer tmp has role 'temp'"),  # type: ignore[arg-type]
    (Buffer("in-1", 2, "input"), "buffer 'in-1' is not a C identifier"),
])
def test_verify_checks_the_buffers(buffer: Buffer, message: str) -> None:
    with pytest.raises(IRError, match=message):
        verify(kernel_of(good_body(), buffer))


def test_the_ir_has_only_the_loop_kinds_that_lowering_and_the_backends_use() -> None:
    assert LOOP_KINDS == ("serial", "vectorized", "unrolled", "gpu_grid", "gpu_thread")


# --- printing --------------------------------------------------------------------------------


def cuda_printer(check_bounds: bool = False) -> CudaPrinter:
    return CudaPrinter(kernel_of(good_body()), {"p0": "k_p0"}, fast_math=False,
                       check_bounds=check_bounds)


@pytest.mark.parametrize("value,ir_text,cuda_text", [
    (math.nan, "NAN", "CNNC_NAN"),
    (math.inf, "INFINITY", "CNNC_INF"),
    (-math.inf, "-INFINITY", "(-CNNC_INF)"),
    (-1.5, "-1.5f", "(-1.5f)"),
    (1e-05, "1e-05f", "1e-05f"),
    (2.0, "2.0f", "2.0f"),
    (-3, "-3", "(-3)"),
])
def test_constants_print_alike_in_the_ir_text_and_in_cuda(value: float, ir_text: str,
                                                          cuda_text: str) -> None:
    assert CStylePrinter().expr(Const(value)) == ir_text
    assert cuda_printer().expr(Const(value)) == cuda_text


def test_the_cuda_printer_overrides_only_what_cuda_spells_differently() -> None:
    half = Bin("//", ROW, Const(2))
    expr = maximum((Load("in0", ROW) + Local("acc")) * Call("exp", Load("p0", half)), Const(0.0))
    cond = Bin("and", less(Const(-1), ROW), Bin("<=", ROW + 1, Const(8)))
    assert text(expr) == "max((in0[i] + acc) * exp(p0[i / 2]), 0.0f)"
    assert text(cond) == "-1 < i && i + 1 <= 8"
    printer = cuda_printer()
    assert not printer.uses_max
    assert printer.expr(expr) == "cnnc_max((in0[i] + acc) * expf(k_p0[i / 2]), 0.0f)"
    assert printer.uses_max
    assert printer.expr(cond) == "(-1) < i && i + 1 <= 8"
    assert cuda_printer(check_bounds=True).expr(Load("p0", ROW)) == \
        'CNNC_AT(k_p0, i, 2, "k", "p0")'
    assert printer.block([For("i", 8, [Store("out", ROW, Const(1.0))], "unrolled")], 1) == [
        "    #pragma unroll",
        "    for (int i = 0; i < 8; ++i) {",
        "        out[i] = 1.0f;",
        "    }",
    ]


def test_kernel_text_prints_the_whole_kernel() -> None:
    kernel = kernel_of(good_body())
    assert kernel.to_text().splitlines()[2:] == [
        "const float p0[2] = {...};",
        "kernel k(const float in0[8], float out[8]) {",
        "  for (i = 0; i < 8; i++) {  // unrolled",
        "    float acc = p0[0];",
        "    if (-1 < i && i < 8) {",
        "      acc = acc + (i < 4 ? in0[i] : 0.0f);",
        "    }",
        "    out[i] = exp(acc);",
        "  }",
        "}",
    ]
