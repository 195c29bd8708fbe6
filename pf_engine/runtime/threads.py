"""Thread settings for CPU forwards (see mixing.mm)."""
from __future__ import annotations

import torch

_USER_THREADS = 1         # torch's thread count as the user set it, while _LIMITED > 0
_LIMITED = 0              # CpuThreads in single-row mode (torch at 1 thread) right now


def user_threads() -> int:
    """The caller's CPU thread count, even while a single-row step has put torch at 1."""
    return _USER_THREADS if _LIMITED else torch.get_num_threads()


_CONTROLLER = None


def _controller():
    """One threadpoolctl controller per process: making one scans the loaded libraries (~1.4 ms),
    which ``threadpool_limits`` did at every limited step."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


class CpuThreads:
    """Thread policy for CPU decode steps (see mixing.mm).

    A step with few rows (``few``: up to 16 with csrc/cpu's kernel built, else 1) runs its
    products in that kernel (or numpy's BLAS) with the caller's thread count, and torch itself at
    one thread: torch's OpenMP workers would otherwise spin between their parallel regions and
    starve the kernel's threads on the same cores.  Steps with more rows (prefill) use torch's
    GEMM with its threads as set.  ``rows`` switches only when the mode changes; ``restore`` puts
    everything back.
    """

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cpu"
        self.threads = user_threads()
        self.limit = None

    def rows(self, n: int) -> None:
        global _USER_THREADS, _LIMITED
        few = n <= self.few()
        if not self.enabled or few == (self.limit is not None):
            return
        if few:
            self.limit = _controller().limit(limits=self.threads, user_api="blas")
            if not _LIMITED:
                _USER_THREADS = self.threads
            _LIMITED += 1
            torch.set_num_threads(1)
        else:
            self.restore()

    @staticmethod
    def few() -> int:
        """Row counts that run with torch at one thread: those whose products go to csrc/cpu's
        kernel (mixing.mm: up to SMALL_N rows, its own OpenMP threads) when it is built, else
        single rows (numpy's BLAS)."""
        from pf_engine.persona.mix import SMALL_N, cpu_kernel
        return SMALL_N if cpu_kernel() else 1

    def restore(self) -> None:
        global _LIMITED
        if self.limit is not None:
            _LIMITED -= 1
            torch.set_num_threads(self.threads)
            self.limit.restore_original_limits()
            self.limit = None
