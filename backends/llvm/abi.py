"""The runner ABI: the native entry points of the LLVM backend's code, declared once.

Each `Signature` gives both the LLVM function type the code is built with (codegen, the
runtime's pool) and the ctypes function Python calls it through (the model, the runtime), so
the two cannot drift. llvmlite is imported only when an LLVM type is asked for: `import cnnc`
does not import it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from llvmlite import ir

Kind = Literal["i32", "i64", "ptr"]  # "ptr": a data pointer, of the type the caller builds with
_CTYPES: dict[Kind, type] = {"i32": ctypes.c_int32, "i64": ctypes.c_int64,
                             "ptr": ctypes.c_void_p}


@dataclass(frozen=True)
class Signature:
    """A native function's result and argument kinds."""

    result: Kind
    arguments: tuple[Kind, ...]

    def function(self, address: int) -> Callable[..., int]:
        """The native function at `address`, called through ctypes (which releases the GIL
        for the call). ctypes caches the prototype: every call of this makes no new one."""
        prototype = ctypes.CFUNCTYPE(_CTYPES[self.result],
                                     *(_CTYPES[kind] for kind in self.arguments))
        return prototype(address)  # type: ignore[no-any-return]

    def ir_arguments(self, pointer: ir.Type) -> tuple[ir.Type, ...]:
        """The LLVM types of the arguments, with `pointer` for each data pointer."""
        return tuple(_ir_type(kind, pointer) for kind in self.arguments)

    def ir_type(self, pointer: ir.Type) -> ir.FunctionType:
        """The LLVM function type, with `pointer` for each data pointer."""
        from llvmlite import ir

        return ir.FunctionType(_ir_type(self.result, pointer), self.ir_arguments(pointer))


def _ir_type(kind: Kind, pointer: ir.Type) -> ir.Type:
    from llvmlite import ir

    return pointer if kind == "ptr" else ir.IntType(int(kind[1:]))


# A variant's runner `cnnc_run_<layout>(x, y, batch, first_block, end_block, arena) -> status`:
# every kernel over batch blocks [first, end), with the input, output and arena pointers.
RUNNER = Signature("i32", ("ptr", "ptr", "i64", "i64", "i64", "ptr"))
# `<runner>_kernel(which, ...)`: kernel `which` alone (counting the edge kernels), for profiling.
RUNNER_KERNEL = Signature("i32", ("i64", *RUNNER.arguments))
# The runtime's `cnnc_call(runner, x_slot, y_slot, batch, first, end, arena)`: the runner on the
# calling thread, x and y read from their slots. Addresses travel as int64.
CALL = Signature("i32", ("i64",) * 7)
# `cnnc_pool_call(control, runner, x_slot, y_slot, batch, blocks, arenas)`.
POOL_CALL = Signature("i32", ("ptr", *("i64",) * 6))
# `cnnc_pool_worker(control, participant, last, spin_cycles) -> last job seen, or -1`.
POOL_WORKER = Signature("i64", ("ptr", "i64", "i64", "i64"))
# `cnnc_sequence(arena, table, count, x_slot, y_slot, batch)`: runners one after another on the
# calling thread, runner table[2i] over table[2i + 1] blocks (a training step's stages).
SEQUENCE = Signature("i32", ("i64",) * 6)
# `cnnc_pool_sequence(control, table, count, x_slot, y_slot, batch, arenas)`: the same, each
# stage shared by the pool's threads.
POOL_SEQUENCE = Signature("i32", ("ptr", *("i64",) * 6))
# `cnnc_pool_ticks() -> the CPU's cycle counter`.
POOL_TICKS = Signature("i64", ())
