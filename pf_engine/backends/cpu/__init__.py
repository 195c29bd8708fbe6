"""The cpu backend: csrc/cpu's fused kernels for decode steps on CPU."""
