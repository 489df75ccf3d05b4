"""The ops exported small CNNs use (issue 12), each computed by PyTorch and matched at
rtol=1e-4, atol=1e-5 by the reference, llvm (fused and unfused, batch and channel layouts)
and cuda-sim; their ONNX forms round-trip; conv + hardswish + pool is one kernel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cnnc
from cnnc import ops
from cnnc.compare import check_output

torch = pytest.importorskip("torch", reason="the op tests compare with PyTorch")
F = torch.nn.functional

CONFIGS = {"llvm": {}, "llvm-unfused": {"fuse": False}, "llvm-channel": {"layout": "channel"},
           "cuda-sim": {"target": "cuda-sim"}}

# op, attrs, PyTorch's computation of it on the conv's output
CASES: dict[str, tuple[str, dict[str, Any], Any]] = {
    "leaky_relu": ("leaky_relu", {"alpha": 0.1}, lambda y: F.leaky_relu(y, 0.1)),
    "relu6": ("relu6", {}, F.relu6),
    "clip": ("clip", {"min": -0.5, "max": 0.75}, lambda y: torch.clamp(y, -0.5, 0.75)),
    "clip_min_only": ("clip", {"min": -0.25}, lambda y: torch.clamp(y, min=-0.25)),
    "hardsigmoid_torch": ("hardsigmoid", {}, F.hardsigmoid),
    "hardsigmoid_onnx": ("hardsigmoid", {"alpha": 0.2, "beta": 0.5},
                         lambda y: torch.clamp(0.2 * y + 0.5, 0, 1)),
    "hardswish": ("hardswish", {}, F.hardswish),
    "elu": ("elu", {"alpha": 1.5}, lambda y: F.elu(y, 1.5)),
    "gelu_erf": ("gelu", {}, F.gelu),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}, lambda y: F.gelu(y, approximate="tanh")),
    "silu": ("silu", {}, F.silu),
    "identity": ("identity", {}, lambda y: y),
    "dropout": ("dropout", {"p": 0.25}, lambda y: F.dropout(y, 0.25, training=False)),
    "log_softmax": ("log_softmax", {}, lambda y: F.log_softmax(y, dim=1)),
    "global_maxpool2d": ("global_maxpool2d", {}, lambda y: y.amax(dim=(2, 3), keepdim=True)),
    "pad": ("pad", {"pads": [[1, 2], [0, 3]], "value": -1.5},
            lambda y: F.pad(y, (0, 3, 1, 2), value=-1.5)),
    "channel_mul": ("channel_mul", {}, lambda y: y * torch.tensor(SCALE).reshape(1, 4, 1, 1)),
    "channel_add": ("channel_add", {}, lambda y: y + torch.tensor(SCALE).reshape(1, 4, 1, 1)),
}
SCALE = np.array([0.5, -2.0, 1.25, 3.0], np.float32)


def conv_then(op: str, attrs: dict[str, Any]) -> tuple[cnnc.Graph, np.ndarray, np.ndarray]:
    """A graph conv2d -> op, its conv weight and bias."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = cnnc.Graph("g", (3, 7, 7))
    graph.add("conv", "conv2d", ["input"], ops.OPS["conv2d"].check_attrs(
        {"out_channels": 4, "kernel_size": 3}), {"weight": weight, "bias": bias})
    checked = ops.OPS[op].check_attrs(attrs)
    shapes = ops.OPS[op].param_shapes(checked, [(4, 5, 5)])
    params = {key: SCALE.reshape(shape) for key, shape in shapes.items()}
    graph.add("op", op, ["conv"], checked, params)
    graph.outputs = ["op"]
    return graph, weight, bias


def torch_answer(case: str, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    y = F.conv2d(torch.from_numpy(x), torch.from_numpy(weight), torch.from_numpy(bias))
    return CASES[case][2](y).numpy()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("case", list(CASES))
def test_each_new_op_matches_pytorch(case: str, config: str) -> None:
    op, attrs, _ = CASES[case]
    graph, weight, bias = conv_then(op, attrs)
    # inputs wide enough that every piece of each function is used (|conv| up to ~20)
    x = (np.random.default_rng(1).standard_normal((3, 3, 7, 7)) * 2).astype(np.float32)
    want = torch_answer(case, x, weight, bias)
    assert check_output("reference", cnnc.reference(graph, x), want).ok
    model = cnnc.compile(graph, use_cache=False, **CONFIGS[config])
    check = check_output("op", model(x), want)
    assert check.ok, check


def test_erf_and_gelu_are_accurate_far_out() -> None:
    """The erf approximation on a wide grid, tails included, at cnnc's tolerance."""
    graph = cnnc.Graph("g", (1, 1, 4001))
    graph.add("op", "gelu", ["input"], ops.OPS["gelu"].check_attrs({}))
    graph.outputs = ["op"]
    x = np.linspace(-12, 12, 4001, dtype=np.float32).reshape(1, 1, 1, -1)
    want = F.gelu(torch.from_numpy(x)).numpy()
    for config in ("llvm", "cuda-sim"):
        check = check_output("gelu", cnnc.compile(graph, use_cache=False,
                                                  **CONFIGS[config])(x), want)
        assert check.ok, check


def test_tanh_keeps_its_relative_accuracy_near_zero() -> None:
    """tanh(x) ~ x for tiny x, to float32's relative precision (rtol=1e-6): 1 - 2/(e^2x + 1)
    alone cancels to 0 there, which a relu after it would read as "off"."""
    graph = cnnc.Graph("g", (1, 1, 13))
    graph.add("t", "tanh", ["input"], {})
    graph.add("r", "relu", ["t"], {})
    graph.outputs = ["r"]
    x = np.array([1e-30, 1e-8, 3.7e-8, 1e-6, 1e-4, 0.01, 0.1, 0.124, 0.126, 0.5, 3.0, 20.0,
                  100.0], np.float32).reshape(1, 1, 1, -1)
    want = np.tanh(x.astype(np.float64))
    for config in ("llvm", "cuda-sim"):
        got = cnnc.compile(graph, use_cache=False, **CONFIGS[config])(x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=config)
        got = cnnc.compile(graph, use_cache=False, **CONFIGS[config])(-x)
        assert (got == 0).all(), config


def test_conv_hardswish_pool_is_one_kernel() -> None:
    graph, _, _ = conv_then("hardswish", {})
    graph.add("pool", "maxpool2d", ["op"], ops.OPS["maxpool2d"].check_attrs({"kernel_size": 2}))
    graph.outputs = ["pool"]
    model = cnnc.compile(graph, use_cache=False)
    assert list(model.kernels) == ["conv2d_hardswish_maxpool2d_0"]


def test_padding_same_is_what_onnx_and_pytorch_mean(tmp_path: Path) -> None:
    path = tmp_path / "same.yaml"
    path.write_text("input: [2, 7, 9]\nlayers:\n"
                    "  - conv2d: {out_channels: 3, kernel_size: [3, 4], padding: same}\n"
                    "  - maxpool2d: {kernel_size: 2, stride: 2, padding: same}\n")
    graph = cnnc.load(path)
    conv, pool = graph.order()[1:]
    assert graph.attrs(conv)["padding"] == ((1, 1), (1, 2))  # PyTorch: left k//2 of k-1
    assert graph.attrs(pool)["padding"] == ((0, 1), (0, 1))  # SAME_UPPER: ceil(7 / 2) = 4
    assert graph.shape(conv) == (3, 7, 9) and graph.shape(pool) == (3, 4, 5)
    weight = torch.from_numpy(graph.params(conv)["weight"])
    x = np.random.default_rng(2).standard_normal((2, 2, 7, 9)).astype(np.float32)
    want = F.conv2d(torch.from_numpy(x), weight, torch.from_numpy(graph.params(conv)["bias"]),
                    padding="same").numpy()
    single = cnnc.Graph("g", (2, 7, 9))
    single.add("conv", "conv2d", ["input"], dict(graph.attrs(conv)), graph.params(conv))
    single.outputs = ["conv"]
    assert check_output("conv", cnnc.compile(single, use_cache=False)(x), want).ok


def test_the_onnx_forms_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("onnx", reason="the round trip needs the onnx package")
    ort = pytest.importorskip("onnxruntime", reason="the round trip needs onnxruntime")
    from cnnc.frontend.onnx_export import save_onnx

    x = (np.random.default_rng(3).standard_normal((2, 3, 7, 7)) * 2).astype(np.float32)
    for case, (op, attrs, _) in CASES.items():
        graph, _, _ = conv_then(op, attrs)
        path = save_onnx(graph, tmp_path / f"{case}.onnx")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": x})
        assert check_output(case, got, cnnc.reference(graph, x)).ok, case
        back = cnnc.load(path)
        ops_back = [back.op(node) for node in back.order()]
        want_op = {"identity": None, "dropout": None}.get(op, op)
        assert ops_back == ["input", "conv2d", *([want_op] if want_op else [])], case
