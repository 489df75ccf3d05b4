"""The GPU binding pass (`cnnc.gpu_bind`): a small kernel's printed text before and after
binding (TVM's Before/Expected), what it stages on LeNet, that the CUDA printer prints only
what the binding says, and that the verifier refuses each broken binding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import GOLDEN

import cnnc
from cnnc.backends.cuda import codegen
from cnnc.gpu_bind import bind_gpu
from cnnc.kernel import (
    Assign,
    Buffer,
    Declare,
    For,
    GpuBinding,
    Kernel,
    Load,
    Local,
    Schedule,
    Store,
    Var,
)
from cnnc.lower import lower
from cnnc.passes import Options, run_pipeline
from cnnc.target import gpu_arch
from cnnc.verify import IRError, verify

HOPPER = gpu_arch("sm_90")
CB, X, K, LANE = Var("cb"), Var("x"), Var("k"), Var("lane")


def conv_add(schedule: Schedule) -> Kernel:
    """out[cb][x] = sum_k w[cb * 3 + k] * in0[x + k] + in1[cb][x]: a 3-tap convolution (its
    input read again by neighbouring points) plus a residual read once, in the one-lane
    layout lowering gives a GPU."""
    point = [
        Declare("acc", Load("w", CB * 3)),
        For("k", 3, [Assign("acc", Local("acc") + Load("w", CB * 3 + K)
                            * Load("in0", X + K + LANE))], "unrolled", role="reduce"),
        Store("out", CB * 4 + X + LANE, Local("acc") + Load("in1", CB * 4 + X + LANE)),
    ]
    body = [For("cb", 2, [For("x", 4, [For("lane", 1, point, "vectorized", role="lane")],
                              role="spatial")], role="channel")]
    buffers = [Buffer("in0", 6, "input"), Buffer("in1", 8, "input"),
               Buffer("w", 6, "param", np.ones(6, np.float32)), Buffer("out", 8, "output")]
    return Kernel("conv_add", ["c1", "add"], buffers, body, schedule)


BEFORE = """\
// layers: c1, add
// schedule: oc_block=1 x_block=1 unroll_max=0 gpu_threads=64 gpu_batch_inner=False \
gpu_shared_tiles=True
const float w[6] = {...};
kernel conv_add(const float in0[6], const float in1[8], float out[8]) {
  for (cb = 0; cb < 2; cb++) {
    for (x = 0; x < 4; x++) {
      for (lane = 0; lane < 1; lane++) {  // vectorized
        float acc = w[cb * 3];
        for (k = 0; k < 3; k++) {  // unrolled
          acc = acc + w[cb * 3 + k] * in0[x + k + lane];
        }
        out[cb * 4 + x + lane] = acc + in1[cb * 4 + x + lane];
      }
    }
  }
}"""

# One block per image: the channel and spatial loops are strided over the block's threads, the
# lane loop is gone, and the convolution's input (read in the reduction) is staged; the
# residual, read once, is not.
EXPECTED_BLOCK_PER_IMAGE = """\
// layers: c1, add
// schedule: oc_block=1 x_block=1 unroll_max=0 gpu_threads=64 gpu_batch_inner=False \
gpu_shared_tiles=True
// gpu: mapping=block_per_image threads=64 points=8 min_blocks=16
const float w[6] = {...};
kernel conv_add(staged const float in0[6], const float in1[8], float out[8]) {
  for (cb = 0; cb < 2; cb++) {  // gpu_thread
    for (x = 0; x < 4; x++) {  // gpu_thread
      float acc = w[cb * 3];
      for (k = 0; k < 3; k++) {  // unrolled
        acc = acc + w[cb * 3 + k] * in0[x + k];
      }
      out[cb * 4 + x] = acc + in1[cb * 4 + x];
    }
  }
}"""

# Without shared tiles the grid's threads take images and points and nothing is staged; a
# block is never larger than the architecture allows.
EXPECTED_IMAGE_MINOR = """\
// layers: c1, add
// schedule: oc_block=1 x_block=1 unroll_max=0 gpu_threads=4096 gpu_batch_inner=True \
gpu_shared_tiles=False
// gpu: mapping=image_minor threads=1024 points=8 min_blocks=1
const float w[6] = {...};
kernel conv_add(const float in0[6], const float in1[8], float out[8]) {
  for (cb = 0; cb < 2; cb++) {  // gpu_grid
    for (x = 0; x < 4; x++) {  // gpu_grid
      float acc = w[cb * 3];
      for (k = 0; k < 3; k++) {  // unrolled
        acc = acc + w[cb * 3 + k] * in0[x + k];
      }
      out[cb * 4 + x] = acc + in1[cb * 4 + x];
    }
  }
}"""


def test_binding_one_block_per_image_stages_the_reused_input() -> None:
    kernel = conv_add(Schedule(gpu_threads=64, gpu_shared_tiles=True))
    assert kernel.to_text() == BEFORE
    bound = bind_gpu(kernel, HOPPER)
    assert bound.to_text() == EXPECTED_BLOCK_PER_IMAGE
    verify(bound)
    assert kernel.to_text() == BEFORE  # the kernel given is not changed
    assert bind_gpu(bound, HOPPER).to_text() == bound.to_text()  # binding twice: the same


def test_binding_the_grid_stages_nothing() -> None:
    bound = bind_gpu(conv_add(Schedule(gpu_threads=4096, gpu_batch_inner=True)), HOPPER)
    assert bound.to_text() == EXPECTED_IMAGE_MINOR
    verify(bound)
    assert bound.gpu == GpuBinding("image_minor", 1024, 8, 1)


def test_a_block_stages_only_what_fits_its_static_shared_memory() -> None:
    small = replace(HOPPER, static_shared_limit=20)  # 5 floats: in0 (6 floats) does not fit
    bound = bind_gpu(conv_add(Schedule(gpu_threads=64, gpu_shared_tiles=True)), small)
    assert bound.staged == []


def test_lenet_convolutions_stage_their_inputs_and_the_printer_follows() -> None:
    compiled = run_pipeline(cnnc.load(GOLDEN / "lenet.yaml"), Options(target="cuda",
                                                                      arch="sm_90"))
    lowered = lower(compiled)
    kernels = [kernel for kernel in lowered.kernels if not kernel.uses_batch]
    bound = [bind_gpu(kernel, HOPPER) for kernel in kernels]
    assert [kernel.gpu.mapping for kernel in bound if kernel.gpu] == \
        ["block_per_image"] * 2 + ["image_minor"] * 3
    assert [[buffer.name for buffer in kernel.staged] for kernel in bound] == \
        [["in0"], ["in0"], [], [], []]
    # The printer prints a kernel bound elsewhere as it is: drop the staging of the first.
    unstaged = replace(bound[0], buffers=[replace(buffer, staged=False)
                                          for buffer in bound[0].buffers])
    program = codegen.generate(replace(lowered, kernels=[unstaged]), "lenet", "sm_90")
    assert program.launches[0].staged == [] and "__shared__" not in program.source
    assert program.launches[0].mapping == "block_per_image"


def bound_kernel() -> Kernel:
    return bind_gpu(conv_add(Schedule(gpu_threads=64, gpu_shared_tiles=True)), HOPPER)


def with_buffer(kernel: Kernel, name: str, **changes: object) -> Kernel:
    return replace(kernel, buffers=[replace(buffer, **changes) if buffer.name == name
                                    else buffer for buffer in kernel.buffers])


def with_kind(kernel: Kernel, kind: str) -> Kernel:
    outer = kernel.body[0]
    assert isinstance(outer, For)
    return replace(kernel, body=[replace(outer, kind=kind)])


@pytest.mark.parametrize("broken,message", [
    (lambda: with_buffer(bound_kernel(), "out", staged=True),
     r"output buffer out is staged, but only the inputs of a block_per_image kernel may be "
     r"\(this one is block_per_image\)"),
    (lambda: with_buffer(bind_gpu(conv_add(Schedule()), HOPPER), "in0", staged=True),
     r"input buffer in0 is staged, .* \(this one is image_major\)"),
    (lambda: replace(bound_kernel(), gpu=GpuBinding("image_major", 64, 8, 16)),
     "loop cb at the top of the kernel is gpu_thread, not gpu_grid as its image_major"),
    (lambda: with_buffer(conv_add(Schedule()), "in0", staged=True),
     "buffer in0 is staged but the kernel is not bound to a GPU"),
    (lambda: with_kind(bound_kernel(), "serial"),
     "loop cb at the top of the kernel is serial, not gpu_thread as its block_per_image"),
    (lambda: with_kind(conv_add(Schedule()), "gpu_grid"),
     "loop cb is gpu_grid but is not a channel or spatial loop at the top of a kernel bound"),
    (lambda: replace(bound_kernel(), gpu=GpuBinding("block_per_image", 64, 9, 16)),
     "the GPU binding says 9 points per image; its loops have 8"),
    (lambda: replace(bound_kernel(), gpu=GpuBinding("block_per_image", 2048, 8, 1)),
     "a GPU launch of 2048 threads per block"),
    (lambda: with_buffer(bound_kernel(), "in1", size=12 * 1024, staged=True),
     "staged buffers take 49176 bytes of shared memory; a block has 49152"),
    (lambda: replace(bound_kernel(), uses_batch=True),
     "a kernel that reads the batch is bound to a GPU"),
])
def test_verify_refuses_a_broken_binding(broken: object, message: str) -> None:
    assert callable(broken)
    with pytest.raises(IRError, match=message):
        verify(broken())


def test_a_kernel_that_reads_the_batch_is_not_bound() -> None:
    kernel = replace(conv_add(Schedule()), uses_batch=True)
    with pytest.raises(ValueError, match="kernel conv_add reads the batch"):
        bind_gpu(kernel, HOPPER)
