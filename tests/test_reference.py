"""The NumPy reference: every golden case (computed with PyTorch), and each op on values worked
out by hand, most of them the examples of Dive into Deep Learning, chapter 6."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import yaml
from conftest import GOLDEN, one_op_graph
from numpy.testing import assert_allclose, assert_array_equal

import cnnc
from cnnc import ops

RunOp = Callable[..., np.ndarray]

CASES = sorted(path.name.removesuffix(".yaml") for path in GOLDEN.glob("*.yaml"))


def test_every_golden_case_is_found() -> None:
    assert len(CASES) == 16


@pytest.mark.parametrize("case", CASES)
def test_golden_case(case: str) -> None:
    graph = cnnc.load(GOLDEN / f"{case}.yaml")
    io = np.load(GOLDEN / f"{case}.io.npz")
    result = cnnc.reference(graph, io["input"])
    outputs = result if isinstance(result, tuple) else (result,)
    assert len(outputs) == len(graph.outputs)
    assert all(output.dtype == np.float32 for output in outputs)
    assert_allclose(outputs[0], io["expected"], rtol=1e-4, atol=1e-5)
    # A model with several outputs names each by the layer written in `outputs`, in order.
    written = yaml.safe_load((GOLDEN / f"{case}.yaml").read_text())
    if len(outputs) > 1:
        names = [str(name) for name in written["outputs"]]
        for name, actual in zip(names, outputs, strict=True):
            assert_allclose(actual, io[f"expected_{name}"], rtol=1e-4, atol=1e-5)


# --- conv2d ----------------------------------------------------------------------------------


def d2l_edge_image() -> np.ndarray:
    """The 6x8 image of D2L 6.2: white (1) with black (0) columns 2 to 5."""
    image = np.ones((1, 1, 6, 8), np.float32)
    image[..., 2:6] = 0
    return image


def test_conv_edge_detection(run_op: RunOp) -> None:
    y = run_op("conv2d", d2l_edge_image(), {"weight": [[[[1, -1]]]]},
               out_channels=1, kernel_size=[1, 2], bias=False)
    row = [0, 1, 0, 0, 0, -1, 0]
    assert_array_equal(y, np.array([[[row] * 6]], np.float32))


def test_conv_edge_kernel_misses_horizontal_edges(run_op: RunOp) -> None:
    image = d2l_edge_image().transpose(0, 1, 3, 2)
    y = run_op("conv2d", image, {"weight": [[[[1, -1]]]]},
               out_channels=1, kernel_size=[1, 2], bias=False)
    assert_array_equal(y, np.zeros((1, 1, 8, 5), np.float32))


D2L_TWO_CHANNELS = np.array([[[[0, 1, 2], [3, 4, 5], [6, 7, 8]],
                              [[1, 2, 3], [4, 5, 6], [7, 8, 9]]]], np.float32)
D2L_KERNEL = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 4]]], np.float32)


def test_conv_sums_over_input_channels(run_op: RunOp) -> None:
    y = run_op("conv2d", D2L_TWO_CHANNELS, {"weight": D2L_KERNEL[None]},
               out_channels=1, kernel_size=2, bias=False)
    assert_array_equal(y, [[[[56, 72], [104, 120]]]])


def test_conv_one_kernel_per_output_channel(run_op: RunOp) -> None:
    weight = np.stack([D2L_KERNEL, D2L_KERNEL + 1, D2L_KERNEL + 2])
    y = run_op("conv2d", D2L_TWO_CHANNELS, {"weight": weight},
               out_channels=3, kernel_size=2, bias=False)
    expected = [[[56, 72], [104, 120]], [[76, 100], [148, 172]], [[96, 128], [192, 224]]]
    assert_array_equal(y, [expected])


def test_conv1x1_mixes_channels_per_pixel(run_op: RunOp) -> None:
    x = np.array([[[[1, 2], [3, 4]], [[10, 20], [30, 40]]]], np.float32)
    y = run_op("conv2d", x, {"weight": [[[[1]], [[2]]], [[[-1]], [[0]]]]},
               out_channels=2, kernel_size=1, bias=False)
    assert_array_equal(y, [[[[21, 42], [63, 84]], [[-1, -2], [-3, -4]]]])


def test_conv_bias_is_added_per_channel(run_op: RunOp) -> None:
    y = run_op("conv2d", np.zeros((1, 1, 2, 2)), {"weight": np.ones((2, 1, 1, 1)), "bias": [3, -1]},
               out_channels=2, kernel_size=1)
    assert_array_equal(y, [[[[3, 3], [3, 3]], [[-1, -1], [-1, -1]]]])


def test_conv_padding_adds_zeros_around(run_op: RunOp) -> None:
    y = run_op("conv2d", np.ones((1, 1, 3, 3)), {"weight": np.ones((1, 1, 3, 3))},
               out_channels=1, kernel_size=3, padding=1, bias=False)
    assert_array_equal(y, [[[[4, 6, 4], [6, 9, 6], [4, 6, 4]]]])


def test_conv_stride_skips_positions(run_op: RunOp) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    y = run_op("conv2d", x, {"weight": np.ones((1, 1, 2, 2))},
               out_channels=1, kernel_size=2, stride=2, bias=False)
    assert_array_equal(y, [[[[10, 18], [42, 50]]]])


@pytest.mark.parametrize(
    ("kernel", "padding", "stride", "expected_hw"),
    [(3, 1, 1, (8, 8)), ([5, 3], [2, 1], 1, (8, 8)), (3, 1, 2, (4, 4)),
     ([3, 5], [0, 1], [3, 4], (2, 2))],
)
def test_conv_output_size_d2l_6_3(run_op: RunOp, kernel: object, padding: object,
                                  stride: object, expected_hw: tuple[int, int]) -> None:
    kh, kw = kernel if isinstance(kernel, list) else (kernel, kernel)
    y = run_op("conv2d", np.ones((1, 1, 8, 8)), {"weight": np.ones((1, 1, kh, kw))},
               out_channels=1, kernel_size=kernel, padding=padding, stride=stride, bias=False)
    assert y.shape == (1, 1, *expected_hw)


def test_conv_dilation_spreads_the_kernel(run_op: RunOp) -> None:
    # Each output sums x[i, j], x[i, j+2], x[i+2, j], x[i+2, j+2] = 4 * x[i, j] + 24.
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    y = run_op("conv2d", x, {"weight": np.ones((1, 1, 2, 2))},
               out_channels=1, kernel_size=2, dilation=2, bias=False)
    assert_array_equal(y, [[[[24, 28, 32], [44, 48, 52], [64, 68, 72]]]])


def test_conv_padding_per_side(run_op: RunOp) -> None:
    # [[top, bottom], [left, right]] = [[0, 1], [2, 0]]: 2x2 ones become 3x4.
    y = run_op("conv2d", np.ones((1, 1, 2, 2)), {"weight": np.ones((1, 1, 1, 1))},
               out_channels=1, kernel_size=1, padding=[[0, 1], [2, 0]], bias=False)
    assert_array_equal(y, [[[[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0]]]])


def test_conv_groups_keep_channels_apart(run_op: RunOp) -> None:
    # Depthwise: channel 0 is scaled by 2, channel 1 by -1; nothing crosses over.
    x = np.array([[[[1, 2]], [[3, 4]]]], np.float32)
    y = run_op("conv2d", x, {"weight": [[[[2]]], [[[-1]]]]},
               out_channels=2, kernel_size=1, groups=2, bias=False)
    assert_array_equal(y, [[[[2, 4]], [[-3, -4]]]])


def test_conv_groups_of_two_channels(run_op: RunOp) -> None:
    # groups=2 over 4 channels: output 0 sums channels 0 and 1, output 1 sums channels 2 and 3.
    x = np.arange(1, 5, dtype=np.float32).reshape(1, 4, 1, 1)
    y = run_op("conv2d", x, {"weight": np.ones((2, 2, 1, 1))},
               out_channels=2, kernel_size=1, groups=2, bias=False)
    assert_array_equal(y, [[[[3]], [[7]]]])


# --- dense, flatten --------------------------------------------------------------------------


def test_dense_is_x_times_weight_transposed_plus_bias(run_op: RunOp) -> None:
    y = run_op("dense", [[1, 2], [3, -1]], {"weight": [[1, 0], [0, 1], [1, 1]], "bias": [0, 0, 1]},
               units=3)
    assert_array_equal(y, [[1, 2, 4], [3, -1, 3]])


def test_flatten_is_channel_major(run_op: RunOp) -> None:
    x = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    assert_array_equal(run_op("flatten", x), [[0, 1, 2, 3, 4, 5, 6, 7]])


# --- pooling ---------------------------------------------------------------------------------

NINE = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
SIXTEEN = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)


def test_maxpool_2x2(run_op: RunOp) -> None:
    assert_array_equal(run_op("maxpool2d", NINE, kernel_size=2, stride=1), [[[[4, 5], [7, 8]]]])


def test_avgpool_2x2(run_op: RunOp) -> None:
    assert_array_equal(run_op("avgpool2d", NINE, kernel_size=2, stride=1), [[[[2, 3], [5, 6]]]])


def test_pool_stride_defaults_to_kernel(run_op: RunOp) -> None:
    assert_array_equal(run_op("maxpool2d", SIXTEEN, kernel_size=3), [[[[10]]]])


def test_maxpool_padding_and_stride(run_op: RunOp) -> None:
    y = run_op("maxpool2d", SIXTEEN, kernel_size=3, padding=1, stride=2)
    assert_array_equal(y, [[[[5, 7], [13, 15]]]])


def test_maxpool_rectangular_padding_and_stride(run_op: RunOp) -> None:
    y = run_op("maxpool2d", SIXTEEN, kernel_size=[2, 3], padding=[0, 1], stride=[2, 3])
    assert_array_equal(y, [[[[5, 7], [13, 15]]]])


def test_pooling_keeps_channels(run_op: RunOp) -> None:
    x = np.concatenate([SIXTEEN, SIXTEEN + 1], axis=1)
    y = run_op("maxpool2d", x, kernel_size=3, padding=1, stride=2)
    assert_array_equal(y, [[[[5, 7], [13, 15]], [[6, 8], [14, 16]]]])


def test_maxpool_pads_with_minus_infinity(run_op: RunOp) -> None:
    # Every window holds one real value and three of padding: zeros would win if used.
    x = -np.array([[[[1, 2], [3, 4]]]], np.float32)
    y = run_op("maxpool2d", x, kernel_size=2, padding=1, stride=2)
    assert_array_equal(y, [[[[-1, -2], [-3, -4]]]])


def test_avgpool_count_include_pad(run_op: RunOp) -> None:
    x = np.array([[[[1, 2], [3, 4]]]], np.float32)
    counted = run_op("avgpool2d", x, kernel_size=2, padding=1, stride=2)
    assert_array_equal(counted, [[[[0.25, 0.5], [0.75, 1]]]])
    not_counted = run_op("avgpool2d", x, kernel_size=2, padding=1, stride=2,
                         count_include_pad=False)
    assert_array_equal(not_counted, [[[[1, 2], [3, 4]]]])


def test_maxpool_ceil_mode_keeps_partial_windows(run_op: RunOp) -> None:
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    assert_array_equal(run_op("maxpool2d", x, kernel_size=2), [[[[6, 8], [16, 18]]]])
    y = run_op("maxpool2d", x, kernel_size=2, ceil_mode=True)
    assert_array_equal(y, [[[[6, 8, 9], [16, 18, 19], [21, 23, 24]]]])


def test_avgpool_ceil_mode_divides_by_the_part_inside(run_op: RunOp) -> None:
    # The partial windows [4, 9], [20, 21], [24] average only what they cover.
    x = np.arange(25, dtype=np.float32).reshape(1, 1, 5, 5)
    y = run_op("avgpool2d", x, kernel_size=2, ceil_mode=True)
    assert_array_equal(y, [[[[3, 5, 6.5], [13, 15, 16.5], [20.5, 22.5, 24]]]])


def test_ceil_mode_drops_a_window_that_starts_in_the_padding(run_op: RunOp) -> None:
    # 3 values padded by 1 on each side: windows at 0 and 2; one at 4 would be all padding.
    assert ops.window_out(3, 2, 2, (1, 1), ceil_mode=True) == 2
    x = np.array([[[[1, 2, 3]]]], np.float32)
    y = run_op("maxpool2d", x, kernel_size=[1, 2], padding=[0, 1], ceil_mode=True)
    assert_array_equal(y, [[[[1, 3]]]])


def test_avgpool_ceil_mode_with_padding_counts_padding_not_overhang(run_op: RunOp) -> None:
    # 3 values, kernel 2, stride 2, padding 1 on the left only: windows [pad, 1] and [2, 3].
    x = np.array([[[[1, 2, 3]]]], np.float32)
    y = run_op("avgpool2d", x, kernel_size=[1, 2], padding=[[0, 0], [1, 0]], ceil_mode=True)
    assert_array_equal(y, [[[[0.5, 2.5]]]])
    # With one more value the last window hangs past the input: it divides by 1, not 2.
    x = np.array([[[[1, 2, 3, 4]]]], np.float32)
    y = run_op("avgpool2d", x, kernel_size=[1, 2], padding=[[0, 0], [1, 0]], ceil_mode=True)
    assert_array_equal(y, [[[[0.5, 2.5, 4]]]])


def test_ceil_mode_window_longer_than_the_input(run_op: RunOp) -> None:
    # PyTorch keeps one window that starts in the input, even if it hangs past it.
    x = np.array([[[[3]]]], np.float32)
    assert_array_equal(run_op("maxpool2d", x, kernel_size=2, ceil_mode=True), [[[[3]]]])
    assert_array_equal(run_op("avgpool2d", x, kernel_size=2, ceil_mode=True), [[[[3]]]])
    with pytest.raises(ops.ShapeError, match="larger than the padded input"):
        run_op("maxpool2d", x, kernel_size=2, stride=1, ceil_mode=True)


def test_global_avgpool(run_op: RunOp) -> None:
    x = np.array([[[[1, 2], [3, 6]], [[0, 0], [0, -4]]]], np.float32)
    assert_array_equal(run_op("global_avgpool2d", x), [[[[3]], [[-1]]]])


# --- batch norm, activations, softmax --------------------------------------------------------


def test_batchnorm_inference(run_op: RunOp) -> None:
    # (x - mean) / sqrt(var + eps) * weight + bias with mean 3, var 4, weight 2, bias 1.
    params = {"weight": [2, 1], "bias": [1, 0], "running_mean": [3, 0], "running_var": [4, 1]}
    x = np.array([[[[5, 1]], [[7, -7]]]], np.float32)
    y = run_op("batchnorm2d", x, params, eps=1e-5)
    assert_allclose(y, [[[[3, -1]], [[7, -7]]]], rtol=1e-4, atol=1e-5)


def test_batchnorm_eps(run_op: RunOp) -> None:
    params = {"weight": [1], "bias": [0], "running_mean": [0], "running_var": [0]}
    y = run_op("batchnorm2d", np.full((1, 1, 1, 1), 1.0), params, eps=0.25)
    assert_allclose(y, [[[[2.0]]]], rtol=1e-6)


def test_relu_and_tanh(run_op: RunOp) -> None:
    x = np.array([[-2, 0, 3]], np.float32)
    assert_array_equal(run_op("relu", x), [[0, 0, 3]])
    assert_allclose(run_op("tanh", x), [[math.tanh(-2), 0, math.tanh(3)]], rtol=1e-6)


def test_sigmoid_values(run_op: RunOp) -> None:
    x = np.array([[-1, 0, 2]], np.float32)
    assert_allclose(run_op("sigmoid", x), [[1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-2))]],
                    rtol=1e-6)


def test_sigmoid_of_huge_inputs_does_not_overflow(run_op: RunOp) -> None:
    x = np.array([[-1e30, -1000, -100, 100, 1000, 1e30]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = run_op("sigmoid", x)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            direct = ops.OPS["sigmoid"].compute({}, {}, [x.astype(np.float64)])
    assert_allclose(y, [[0, 0, 0, 1, 1, 1]], rtol=0, atol=1e-30)
    assert_allclose(direct, y, rtol=1e-6, atol=1e-30)


def test_softmax_rows_sum_to_one(run_op: RunOp) -> None:
    x = np.array([[0, math.log(2)], [1000, 1000], [-5, 5]], np.float32)
    y = run_op("softmax", x)
    assert_allclose(y[:2], [[1 / 3, 2 / 3], [0.5, 0.5]], rtol=1e-6)
    assert_allclose(y.sum(axis=1), [1, 1, 1], rtol=1e-6)
    assert np.isfinite(y).all()


def test_softmax_of_an_image_is_over_channels(run_op: RunOp) -> None:
    x = np.zeros((1, 4, 2, 3), np.float32)
    assert_allclose(run_op("softmax", x), np.full((1, 4, 2, 3), 0.25), rtol=1e-6)


# --- joins -----------------------------------------------------------------------------------


def join_graph(op: str, operands: list[str]) -> cnnc.Graph:
    """input -> a = relu(input), b = tanh(input); y = op(operands)."""
    graph = cnnc.Graph(op, (1, 1, 2))
    graph.add("a", "relu", ["input"])
    graph.add("b", "tanh", ["input"])
    graph.add("y", op, operands)
    graph.outputs = ["y"]
    return graph


def test_add_of_three_operands() -> None:
    x = np.array([[[[-1, 2]]]], np.float32)
    y = cnnc.reference(join_graph("add", ["a", "input", "a"]), x)
    assert_array_equal(y, [[[[-1, 6]]]])


def test_concat_keeps_operand_order() -> None:
    x = np.array([[[[-1, 0]]]], np.float32)
    y = cnnc.reference(join_graph("concat", ["input", "a"]), x)
    assert_array_equal(y, [[[[-1, 0]], [[0, 0]]]])


# --- inputs and outputs ----------------------------------------------------------------------


def test_reference_returns_float32_for_integer_input(run_op: RunOp) -> None:
    graph = one_op_graph("relu", (1, 2, 2))
    y = cnnc.reference(graph, np.array([[[[1, -2], [3, -4]]]], np.int64))
    assert isinstance(y, np.ndarray)
    assert y.dtype == np.float32
    assert_array_equal(y, [[[[1, 0], [3, 0]]]])


def test_reference_returns_a_tuple_for_several_outputs() -> None:
    graph = join_graph("add", ["a", "b"])
    graph.outputs = ["a", "y"]
    result = cnnc.reference(graph, np.array([[[[-1, 0]]]], np.float32))
    assert isinstance(result, tuple)
    assert [array.shape for array in result] == [(1, 1, 1, 2), (1, 1, 1, 2)]


def test_reference_keeps_batch_rows_apart(run_op: RunOp) -> None:
    x = np.stack([NINE[0], NINE[0] * -1])
    y = run_op("maxpool2d", x, kernel_size=2, stride=1)
    assert_array_equal(y, [[[[4, 5], [7, 8]]], [[[0, -1], [-3, -4]]]])


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((1, 3, 3)), "model 'relu' expects input f32[N,1,3,3], got shape (1, 3, 3)"),
        (np.zeros((2, 1, 3, 4)), "model 'relu' expects input f32[N,1,3,3], got shape (2, 1, 3, 4)"),
        (np.array([[[["a"] * 3] * 3]]), "model 'relu' expects a float array f32[N,1,3,3], "
                                        "got dtype <U1"),
    ],
)
def test_reference_refuses_a_wrong_input(x: np.ndarray, message: str) -> None:
    with pytest.raises(cnnc.InputError) as error:
        cnnc.reference(one_op_graph("relu", (1, 3, 3)), x)
    assert str(error.value) == message
