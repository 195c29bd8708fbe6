"""Thread settings for CPU forwards (see mixing.mm)."""
from __future__ import annotations

import torch


class CpuThreads:
    """Thread policy for CPU decode steps (see mixing.mm).

    A step with a single row runs its GEMVs in numpy's BLAS with the caller's torch thread count,
    and torch itself at one thread: torch's OpenMP workers would otherwise spin between their
    parallel regions and starve the BLAS threads on the same cores.  Steps with several rows
    (prefill, batched decode) use torch's GEMM with its threads as set.  ``rows`` switches only
    when the mode changes; ``restore`` puts everything back.
    """

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cpu"
        self.threads = torch.get_num_threads()
        self.limit = None

    def rows(self, n: int) -> None:
        if not self.enabled or (n == 1) == (self.limit is not None):
            return
        if n == 1:
            from threadpoolctl import threadpool_limits
            self.limit = threadpool_limits(self.threads, user_api="blas")
            torch.set_num_threads(1)
        else:
            self.restore()

    def restore(self) -> None:
        if self.limit is not None:
            torch.set_num_threads(self.threads)
            self.limit.restore_original_limits()
            self.limit = None
