"""The LLVM backend: kernel IR -> LLVM IR (llvmlite.ir) -> native code for the host CPU."""
