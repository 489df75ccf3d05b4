"""Models built with torch.nn, exported with torch.onnx.export (the default exporter and the
legacy one, `dynamo=False`, both with a dynamic batch axis), loaded by cnnc and compiled: each
matches PyTorch at rtol=1e-4, atol=1e-5 on llvm (fused and unfused) and cuda-sim. Models with
ops cnnc lacks get one error naming every unsupported node."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.compare import check_outputs

torch = pytest.importorskip("torch", reason="the export tests need PyTorch (torch==2.13.0 CPU)")
pytest.importorskip("onnx", reason="the export tests need the onnx package")
nn = torch.nn

EXPORTERS = ("legacy", "dynamo")


def lenet(activation: type[nn.Module], pool: type[nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), activation(), pool(2),
        nn.Conv2d(6, 16, 5), activation(), pool(2), nn.Flatten(),
        nn.Linear(16 * 2 * 2, 32), activation(), nn.Linear(32, 10))


def mnist_cnn(log_softmax: bool) -> nn.Module:
    layers = [nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
              nn.Dropout(0.25), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
              nn.Dropout(0.5), nn.Linear(32, 10)]
    return nn.Sequential(*layers, *([nn.LogSoftmax(dim=1)] if log_softmax else []))


def vgg_bn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(nn.BatchNorm2d(3), *block(3, 8), *block(8, 8), nn.MaxPool2d(2),
                         *block(8, 16), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 2 * 2, 10))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(y), 1))


def nin() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
        nn.MaxPool2d(3, 2, ceil_mode=True), nn.Conv2d(16, 10, 3, padding=1), nn.ReLU(),
        nn.Conv2d(10, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class Views(nn.Module):
    """Flatten, view(n, -1), torch.cat and x.mean((2, 3)), with two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Conv2d(2, 4, 3, padding=1)
        self.right = nn.Conv2d(2, 4, 3, padding="same")
        self.pool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8 * 3 * 3, 5)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.pool(torch.cat([torch.tanh(self.left(x)), torch.sigmoid(self.right(x))], 1))
        flat = torch.softmax(self.fc(y.view(y.size(0), -1)), dim=1)
        return flat, self.head(y.mean((2, 3)))


class Mobile(nn.Module):
    """Depthwise convolutions with ReLU6 (a Clip with constant bounds), Hardswish and
    LeakyReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act2 = nn.Hardswish()
        self.pw = nn.Conv2d(8, 8, 1)
        self.act3 = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act3(self.pw(self.act2(self.dw(self.act1(self.stem(x))))))


MODELS = {  # name: (module, per-sample input shape)
    "lenet_sigmoid_avgpool": (lambda: lenet(nn.Sigmoid, nn.AvgPool2d), (1, 16, 16)),
    "lenet_relu_maxpool": (lambda: lenet(nn.ReLU, nn.MaxPool2d), (1, 16, 16)),
    "mnist_cnn": (lambda: mnist_cnn(False), (1, 12, 12)),
    "vgg_bn": (vgg_bn, (3, 8, 8)),
    "resnet": (ResNet, (3, 8, 8)),
    "nin": (nin, (3, 9, 9)),
    "views": (Views, (2, 6, 6)),
    "mnist_cnn_log_softmax": (lambda: mnist_cnn(True), (1, 12, 12)),
    "mobile": (Mobile, (3, 6, 6)),
}


class Unsupported(nn.Module):
    """Three layers cnnc lacks: a transposed convolution, bilinear resizing and PReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.resize = nn.Upsample(scale_factor=2, mode="bilinear")
        self.act = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.resize(self.up(x)))


def export(module: nn.Module, shape: tuple[int, ...], path: Path, exporter: str,
           outputs: int = 1) -> None:
    x = torch.randn(2, *shape)
    names = [f"y{index}" for index in range(outputs)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {name: {0: "N"} for name in ["x", *names]}
            # no constant folding: batch norm stays a BatchNormalization node
            torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=names,
                              dynamic_axes=axes, dynamo=False, do_constant_folding=False)
        else:
            torch.onnx.export(module, (x,), str(path), input_names=["x"], output_names=names,
                              dynamic_shapes=({0: torch.export.Dim("N")},), dynamo=True,
                              verbose=False)


def trained(module: nn.Module) -> nn.Module:
    """Give batch norm statistics that are not the identity, then switch to inference."""
    torch.manual_seed(0)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 1.5)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.5, 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """Every model exported by both exporters, once for the module."""
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, (make, shape) in MODELS.items():
        torch.manual_seed(1)
        module = trained(make())
        torch.save(module.state_dict(), folder / f"{name}.pt")
        for exporter in EXPORTERS:
            path = folder / f"{name}.{exporter}.onnx"
            export(module, shape, path, exporter, outputs=2 if name == "views" else 1)
            paths[name, exporter] = path
    return paths


def torch_outputs(folder: Path, name: str, x: np.ndarray) -> list[np.ndarray]:
    make, _ = MODELS[name]
    module = make().eval()
    module.load_state_dict(torch.load(folder / f"{name}.pt"))
    with torch.no_grad():
        result = module(torch.from_numpy(x))
    results = result if isinstance(result, tuple) else (result,)
    return [item.numpy() for item in results]


CASES = [(name, exporter, target, fuse)
         for name in MODELS for exporter in EXPORTERS
         for target, fuse in (("llvm", True), ("llvm", False), ("cuda-sim", True))
         if exporter == "dynamo" or (target, fuse) == ("llvm", True)
         or name in ("resnet", "views")]


@pytest.mark.parametrize(("name", "exporter", "target", "fuse"), CASES)
def test_an_exported_model_matches_pytorch(exported: dict[tuple[str, str], Path], name: str,
                                           exporter: str, target: str, fuse: bool) -> None:
    path = exported[name, exporter]
    graph = cnnc.load(path)
    assert graph.input_shape == MODELS[name][1]
    x = np.random.default_rng(0).standard_normal((3, *graph.input_shape)).astype(np.float32)
    model = cnnc.compile(graph, target=target, fuse=fuse)
    want = torch_outputs(path.parent, name, x)
    checks = check_outputs(model(x), tuple(want), graph.outputs)
    assert [check.ok for check in checks] == [True] * len(want), checks
    assert all(check.ok for check in check_outputs(cnnc.reference(graph, x), tuple(want)))


def test_layers_are_named_like_the_state_dict(exported: dict[tuple[str, str], Path]) -> None:
    graph = cnnc.load(exported["resnet", "legacy"])
    keys = {f"{node}.{param}" for node in graph.order() for param in graph.params(node)}
    state = torch.load(exported["resnet", "legacy"].parent / "resnet.pt")
    assert keys == {key for key in state if not key.endswith("num_batches_tracked")}
    ops = [graph.op(node) for node in graph.order()]
    assert ops.count("batchnorm2d") == 6
    assert ops.count("add") == 2


def test_dropout_shape_chains_and_identities_leave_no_node(
        exported: dict[tuple[str, str], Path]) -> None:
    for exporter in EXPORTERS:
        graph = cnnc.load(exported["mnist_cnn", exporter])
        assert [graph.op(node) for node in graph.order()] == [
            "input", "conv2d", "relu", "conv2d", "relu", "maxpool2d", "flatten", "dense",
            "relu", "dense"]


def test_every_unsupported_node_is_named_in_one_error(tmp_path: Path) -> None:
    for exporter in EXPORTERS:
        path = tmp_path / f"unsupported.{exporter}.onnx"
        export(trained(Unsupported()), (3, 4, 4), path, exporter)
        with pytest.raises(cnnc.ModelError) as caught:
            cnnc.load(path)
        lines = str(caught.value).splitlines()
        assert lines[0] == f"{path}: 3 nodes cannot be compiled:"
        kinds = sorted(line.split("(")[1].split(")")[0].split(",")[0] for line in lines[1:])
        assert kinds == ["ConvTranspose", "PRelu", "Resize"]
        assert all(line.startswith(f"  {path}: node '") for line in lines[1:])


def test_the_new_activations_import_as_their_ops(exported: dict[tuple[str, str], Path]) -> None:
    for exporter in EXPORTERS:
        graph = cnnc.load(exported["mobile", exporter])
        assert [graph.op(node) for node in graph.order()] == [
            "input", "conv2d", "relu6", "conv2d", "hardswish", "conv2d", "leaky_relu"]
        leaky = graph.order()[-1]
        assert graph.attrs(leaky) == {"alpha": pytest.approx(0.1)}
        graph = cnnc.load(exported["mnist_cnn_log_softmax", exporter])
        assert graph.op(graph.outputs[0]) == "log_softmax"
