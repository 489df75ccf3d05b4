"""Code generators: `llvm` for the host CPU, `cuda` for NVIDIA GPUs."""
