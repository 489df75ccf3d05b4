"""The model that targets "cuda" and "cuda-sim" return: called on NumPy arrays like the CPU's.

Memory: one arena per batch size N, allocated once. A tensor that the memory plan puts at
per-image offset O with per-image size S occupies floats [O*N, (O+S)*N) of the arena, as a
plain NCHW array of the batch (scaling by N keeps the plan's disjoint tensors disjoint). So
the user's input is copied straight into its tensor and each output straight out of its own:
the pack and unpack kernels of the CPU's batch-blocked layout are not needed on the GPU.

On a GPU, the second call at a batch size up to GRAPH_MAX_BATCH (its arena already allocated)
captures the whole forward pass (input copy, every kernel, output copies) into one CUDA graph,
kept with that arena; later calls at that size copy the input into a pinned staging buffer,
replay the graph and copy the outputs out of another. Where capture fails the model quietly
keeps to plain launches. `last_launch` says which way the latest call went.
"""

from __future__ import annotations

import ctypes
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cnnc.backends.cuda import codegen, nvrtc
from cnnc.backends.cuda.driver_api import (
    CopyIn,
    CopyOut,
    DeviceModule,
    GraphStep,
    Launch,
    device_missing,
    pack_params,
)
from cnnc.errors import CnncError, DeviceError, InputError
from cnnc.graph import Graph
from cnnc.lower import LoweredModel
from cnnc.model import c_name, check_emit
from cnnc.plan import MemoryPlan
from cnnc.reference import check_input, output_bytes
from cnnc.version import __version__

SOURCE_KINDS = ("cuda", "kernel", "ptx")
EXPORT_KINDS = ("cu", "ptx", "cubin", "json")  # `export` writes all of them by default
KEPT_BATCH_SIZES = 4  # arenas kept allocated, most recently used first
GRAPH_MAX_BATCH = 256  # larger batches gain nothing from a graph but pin more host memory


class Runner(Protocol):
    """Device memory and launches: the GPU (driver API) or the simulator."""

    def prepare(self) -> None: ...

    def allocate(self, size: int) -> int: ...

    def free(self, pointer: int) -> None: ...

    def copy_in(self, pointer: int, host: int, size: int) -> None: ...

    def copy_out(self, host: int, pointer: int, size: int) -> None: ...

    def launch(self, kernel: int, grid: int, block: int, params: int) -> None: ...

    def synchronize(self) -> None: ...


@dataclass
class _BatchPlan:
    """An arena for one batch size and the packed launch arguments of every kernel; on a GPU,
    once captured, the CUDA graph of the forward pass and its pinned staging buffers."""

    arena: int
    params: list[int]
    keep_alive: list[Any]
    graph: Any = None  # CUgraphExec
    host_in: int = 0  # pinned staging buffer of the input
    host_out: int = 0  # pinned staging buffer of the outputs, one after the other


class CudaModel:
    """A model compiled to CUDA C. Call it on a float array (N, C, H, W)."""

    def __init__(self, graph: Graph, kernels: list[str], lowered: LoweredModel,
                 memory: MemoryPlan, target: str, arch: str, fast_math: bool,
                 use_cache: bool, check_bounds: bool = False) -> None:
        self.graph = graph
        self.name = graph.name
        self.target = target
        self.arch = arch
        self.fast_math = fast_math
        self.lowered = lowered
        self.memory = memory
        self.kernels = kernels
        self.output_shapes = [graph.shape(name) for name in graph.outputs]
        self.check_bounds = check_bounds
        self.program = codegen.generate(lowered, c_name(graph.name), arch, fast_math,
                                        check_bounds)
        self.file_name = f"{self.program.name}.cu"
        bindings = lowered.bindings
        self.input_tensor = bindings["pack_input"]["packed"]
        self.output_tensors = [bindings[f"unpack_output_{index}"]["packed"]
                               for index in range(len(self.output_shapes))]
        self._use_cache = use_cache
        self._binary: nvrtc.Binary | None = None
        if target == "cuda":
            self._binary = self._compile()
        self._runner: Runner | None = None
        self._plans: OrderedDict[int, _BatchPlan] = OrderedDict()
        self._lock = threading.Lock()
        self.use_graphs = True  # False: plain launches at every batch size
        self.last_launch: str | None = None  # "graph" or "kernels": how the latest call ran
        if target == "cuda-sim":
            self._runner = self._simulator()

    def __reduce__(self) -> tuple[Any, ...]:
        """A pickle carries the model's graph, weights hash, options and schedule, never PTX,
        cubins or device pointers; unpickling rebuilds it once per process (`cnnc.pickling`)."""
        from cnnc import pickling

        return pickling.reduce(self)

    # --- compiling ---------------------------------------------------------------------------

    def _compile(self) -> nvrtc.Binary:
        return nvrtc.compile_source(self.program.source, self.file_name, self.arch,
                                    self.fast_math, self._use_cache)

    def binary(self) -> nvrtc.Binary:
        """PTX, cubin and ptxas report (compiled now for a cuda-sim model)."""
        if self._binary is None:
            self._binary = self._compile()
        return self._binary

    def _simulator(self) -> Runner:
        from cnnc.backends.cuda.simulator import SimKernel, SimLibrary, SimMemory

        kernels = [SimKernel(launch.name,
                             tuple("float*" for _ in launch.arguments) + ("int",),
                             launch.uses_barrier)
                   for launch in self.program.launches]
        library = SimLibrary(self.program.name, self.program.source, kernels, self._use_cache)
        return SimMemory(library)

    @property
    def resources(self) -> dict[str, dict[str, int]]:
        """Per kernel, from ptxas: registers, shared_bytes, spill_bytes (stored),
        spill_load_bytes and stack_bytes. A cuda-sim model compiles with NVRTC to know them,
        and has none where NVRTC is not installed."""
        if self._binary is None and nvrtc.available() is not None:
            return {}
        report = self.binary().resources
        return {name: dict(report[name]) for name in self.kernels if name in report}

    # --- running -----------------------------------------------------------------------------

    def __call__(self, x: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        # The simulator's "device memory" is host memory too: the arena counts.
        arena = self.memory.floats * 4 if self.target == "cuda-sim" else 0
        array = check_input(self.graph, x, output_bytes(self.graph) + arena)
        if self._runner is None:
            missing = device_missing()
            if missing is not None:
                raise DeviceError(f"model '{self.name}' was compiled for target 'cuda', but "
                                  f"{missing}")
        batch = len(array)
        outputs = [np.empty((batch, *shape), np.float32) for shape in self.output_shapes]
        if batch:
            with self._lock:
                self._run(array, outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _device(self) -> Runner:
        if self._runner is None:
            from cnnc.backends.cuda.driver_api import DeviceModule

            binary = self.binary()
            self._runner = DeviceModule(binary.cubin, binary.ptx,
                                        [launch.name for launch in self.program.launches])
        return self._runner

    def _plan(self, runner: Runner, batch: int) -> _BatchPlan:
        plan = self._plans.get(batch)
        if plan is not None:
            self._plans.move_to_end(batch)
            return plan
        if len(self._plans) >= KEPT_BATCH_SIZES:
            _, oldest = self._plans.popitem(last=False)
            self._release(runner, oldest)
        arena = runner.allocate(self.memory_bytes(batch))
        params, keep_alive = [], []
        for launch in self.program.launches:
            values = [self._tensor_pointer(arena, argument.tensor, batch)
                      for argument in launch.arguments] + [batch]
            kinds = ["pointer"] * len(launch.arguments) + ["int"]
            address, holders = pack_params(values, kinds)
            params.append(address)
            keep_alive.append(holders)
        plan = _BatchPlan(arena, params, keep_alive)
        self._plans[batch] = plan
        return plan

    def _tensor_pointer(self, arena: int, tensor: str, batch: int) -> int:
        return arena + self.memory.offsets[tensor] * batch * 4

    def _run(self, array: np.ndarray, outputs: list[np.ndarray]) -> None:
        runner = self._device()
        runner.prepare()
        batch = len(array)
        if any(launch.grid(batch) >= 2**31 for launch in self.program.launches):
            raise InputError(f"batch {batch} is too large for one launch on the GPU")
        allocated = batch in self._plans
        plan = self._plan(runner, batch)
        if allocated and isinstance(runner, DeviceModule) and self._graph(runner, plan, array,
                                                                          outputs):
            try:
                self._replay(runner, plan, array, outputs)
                self.last_launch = "graph"
                return
            except Exception:  # DeviceError, or a binding that does not behave as documented
                # Plain launches from now on; they raise again if the GPU itself failed.
                runner.graphs_available = False
                self._drop_graph(runner, plan)
        runner.copy_in(self._tensor_pointer(plan.arena, self.input_tensor, batch),
                       array.ctypes.data, array.nbytes)
        self._launch_all(runner, plan, batch)
        for output, tensor in zip(outputs, self.output_tensors):
            runner.copy_out(output.ctypes.data, self._tensor_pointer(plan.arena, tensor, batch),
                            output.nbytes)
        self.last_launch = "kernels"

    # --- CUDA graphs -------------------------------------------------------------------------

    def _graph(self, runner: DeviceModule, plan: _BatchPlan, array: np.ndarray,
               outputs: list[np.ndarray]) -> bool:
        """Whether `plan` has a CUDA graph, capturing it now if it may. Never raises: a
        failure leaves the plan without a graph and graphs off for the runner."""
        batch = len(array)
        if not (self.use_graphs and runner.graphs_available and batch <= GRAPH_MAX_BATCH):
            self._drop_graph(runner, plan)
            return False
        if plan.graph is not None:
            return True
        out_bytes = sum(output.nbytes for output in outputs)
        try:
            plan.host_in = runner.allocate_host(array.nbytes)
            plan.host_out = runner.allocate_host(out_bytes)
        except Exception:  # no pinned memory: no graph
            runner.graphs_available = False
            self._drop_graph(runner, plan)
            return False
        steps: list[GraphStep] = [
            CopyIn(self._tensor_pointer(plan.arena, self.input_tensor, batch), plan.host_in,
                   array.nbytes)]
        steps += [Launch(index, launch.grid(batch), launch.threads, plan.params[index])
                  for index, launch in enumerate(self.program.launches)]
        offset = 0
        for output, tensor in zip(outputs, self.output_tensors):
            steps.append(CopyOut(plan.host_out + offset,
                                 self._tensor_pointer(plan.arena, tensor, batch), output.nbytes))
            offset += output.nbytes
        plan.graph = runner.capture(steps)
        if plan.graph is None:
            self._drop_graph(runner, plan)
            return False
        return True

    def _replay(self, runner: DeviceModule, plan: _BatchPlan, array: np.ndarray,
                outputs: list[np.ndarray]) -> None:
        ctypes.memmove(plan.host_in, array.ctypes.data, array.nbytes)
        runner.launch_graph(plan.graph)
        offset = 0
        for output in outputs:
            ctypes.memmove(output.ctypes.data, plan.host_out + offset, output.nbytes)
            offset += output.nbytes

    def _drop_graph(self, runner: Runner, plan: _BatchPlan) -> None:
        """Destroy the plan's graph and free its staging buffers (what of them there is)."""
        if not isinstance(runner, DeviceModule):
            return
        graph, host_in, host_out = plan.graph, plan.host_in, plan.host_out
        plan.graph, plan.host_in, plan.host_out = None, 0, 0
        if graph is not None:
            runner.destroy_graph(graph)
        for pointer in (host_in, host_out):
            if pointer:
                try:
                    runner.free_host(pointer)
                except Exception:  # freeing: nothing more to do
                    pass

    def _release(self, runner: Runner, plan: _BatchPlan) -> None:
        self._drop_graph(runner, plan)
        runner.free(plan.arena)

    def _launch_all(self, runner: Runner, plan: _BatchPlan, batch: int) -> None:
        for index, launch in enumerate(self.program.launches):
            runner.launch(index, launch.grid(batch), launch.threads, plan.params[index])

    def time_kernels(self, batch: int, repeats: int = 20) -> float:
        """Seconds per forward pass on the GPU with the data already there: the kernels alone,
        timed with CUDA events (target "cuda" only)."""
        if self.target != "cuda":
            raise DeviceError("time_kernels measures the GPU; compile with target='cuda'")
        from cnnc.backends.cuda.driver_api import DeviceModule

        with self._lock:
            runner = self._device()
            assert isinstance(runner, DeviceModule)
            runner.prepare()
            plan = self._plan(runner, batch)
            self._launch_all(runner, plan, batch)  # warm up
            return runner.event_seconds(lambda: self._launch_all(runner, plan, batch), repeats)

    def close(self) -> None:
        """Free the device memory this model holds (it allocates again if called later)."""
        with self._lock:
            runner, plans = self._runner, list(self._plans.values())
            self._plans.clear()
            for plan in plans:
                if runner is not None:
                    self._release(runner, plan)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at exit the driver may already be gone
            pass

    def memory_bytes(self, batch: int) -> int:
        """Bytes of device memory for the tensors between kernels at batch size `batch`."""
        if batch < 0:
            raise InputError("batch must be >= 0")
        return self.memory.floats * 4 * batch

    def profile(self, batch: int, seconds: float = 0.2) -> str:
        """Not measured per kernel on a GPU yet: raises, naming what there is instead."""
        raise CnncError(f"model '{self.name}': profile times the kernels of target 'llvm' "
                        f"only; for target {self.target} time_kernels (target 'cuda') times "
                        "the whole forward pass")

    # --- reading and writing the generated code ----------------------------------------------

    def source(self, kind: str = "cuda") -> str:
        """The generated code: "cuda" (CUDA C), "kernel" (the loop IR of the kernels it was
        printed from, after GPU binding) or "ptx" (compiled with NVRTC)."""
        if kind == "cuda":
            return self.program.source
        if kind == "kernel":
            return "\n\n".join(kernel.to_text() for kernel in self.program.kernels) + "\n"
        if kind == "ptx":
            return self.binary().ptx
        raise ValueError(f"unknown source kind {kind!r}; kinds: {', '.join(SOURCE_KINDS)}")

    def export(self, directory: str | Path, emit: Sequence[str] | None = None) -> list[Path]:
        """Write the files of `emit` (None: all of EXPORT_KINDS) for a host program without
        Python: NAME.cu, NAME.ptx, NAME.cubin and NAME.json (how to launch the kernels, the
        arena and its tensors, the parameters). Only "cu" alone needs no NVRTC."""
        kinds = EXPORT_KINDS if emit is None else tuple(emit)
        check_emit(kinds, EXPORT_KINDS)
        contents: dict[str, str | bytes] = {"cu": self.program.source}
        if set(kinds) - {"cu"}:
            binary = self.binary()  # before the description, which lists its resources
            contents.update(ptx=binary.ptx, cubin=binary.cubin,
                            json=json.dumps(self.description(), indent=2) + "\n")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.program.name}.{kind}" for kind in EXPORT_KINDS if kind in kinds]
        for path in paths:
            content = contents[path.suffix[1:]]
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return paths

    def description(self) -> dict[str, Any]:
        """What NAME.json holds."""
        offsets, sizes = self.memory.offsets, self.memory.sizes
        resources = self._binary.resources if self._binary is not None else {}
        stem = self.program.name

        def tensor(name: str) -> dict[str, Any]:
            return {"tensor": name, "offset_floats_per_image": offsets[name],
                    "floats_per_image": sizes[name]}

        kernels = []
        for launch in self.program.launches:
            arguments: list[dict[str, Any]] = [
                {"name": argument.name, "type": "float*",
                 "access": "write" if argument.writes else "read", **tensor(argument.tensor)}
                for argument in launch.arguments]
            arguments.append({"name": "batch", "type": "int", "value": "N"})
            kernels.append({
                "name": launch.name,
                "layers": launch.layers,
                "block": [launch.threads, 1, 1],
                "grid": [f"ceil(N * {launch.items_per_image} / {launch.threads})", 1, 1],
                "items_per_image": launch.items_per_image,
                "mapping": launch.mapping,
                "static_shared_bytes": launch.shared_bytes,
                "dynamic_shared_bytes": 0,
                "arguments": arguments,
                "resources": resources.get(launch.name, {}),
            })
        return {
            "format": "cnnc-cuda-1",
            "model": self.name,
            "cnnc_version": __version__,
            "arch": self.arch,
            "fast_math": self.fast_math,
            "files": {"cuda": f"{stem}.cu", "ptx": f"{stem}.ptx", "cubin": f"{stem}.cubin"},
            "arena": {
                "floats_per_image": self.memory.floats,
                "bytes": "4 * floats_per_image * N",
                "layout": "a tensor at offset O with S floats per image is the NCHW array of "
                          "the N images at floats [O*N, (O+S)*N) of the arena",
            },
            "input": {"shape": ["N", *self.graph.input_shape], **tensor(self.input_tensor)},
            "outputs": [{"name": name, "shape": ["N", *shape], **tensor(tensor_name)}
                        for name, shape, tensor_name in zip(self.graph.outputs,
                                                            self.output_shapes,
                                                            self.output_tensors)],
            "kernels": kernels,
            "parameters": [{"symbol": param.symbol, "kernel": param.kernel,
                            "buffer": param.buffer, "floats": param.floats,
                            "space": param.space, "embedded": True}
                           for param in self.program.parameters],
            "steps": [
                f"load {stem}.cubin with cuModuleLoadData ({stem}.ptx on another GPU); the "
                "parameters are in the module",
                "allocate the arena: 4 * arena.floats_per_image * N bytes",
                "copy the N input images (NCHW float32) to the input tensor's place",
                "launch the kernels in order: grid and block as given, arguments the places of "
                "their tensors in the arena, then N",
                "copy each output from its tensor's place",
            ],
        }

    def __repr__(self) -> str:
        return (f"<CudaModel {self.name!r} target={self.target} arch={self.arch} "
                f"kernels={len(self.kernels)}>")
