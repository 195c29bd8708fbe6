"""The CPU thread settings of the process: one policy object, entered by every forward on CPU.

A forward with few rows (a decode step: at most ``backend.few_rows``; on the cpu backend any
forward of a model stored as bytes, ``backend.own_threads``) runs its products in the
backend's own threads (csrc/cpu's pool, or numpy's BLAS for one row on the torch backend) with
the caller's thread count, and torch itself at one thread: torch's OpenMP workers would
otherwise spin between their small ops and starve the kernel's threads on the same cores.
Forwards with more rows (prefill, scoring) use torch's GEMMs with its threads as set.

``POLICY.forward(device, few)`` is a context: it takes the policy's lock (the background
scheduler and a ``generate`` call's private scheduler never flip torch's settings under each
other), records the caller's thread count (``threads()``, what the kernels are given), sets
torch and BLAS for the mode, and puts everything back on exit.  The caller's count is torch's
``get_num_threads()`` as found at entry (``pf-generate --threads N`` sets it).
"""
from __future__ import annotations

import contextlib
import threading

import torch


class ThreadPolicy:
    def __init__(self):
        self._lock = threading.RLock()
        self._threads: int | None = None          # the caller's count, inside a forward
        self._controller = None

    def threads(self) -> int:
        """The thread count the backend's kernels use: the caller's, even while torch is at 1."""
        return self._threads or torch.get_num_threads()

    def _blas(self):
        """One threadpoolctl controller per process (making one scans the loaded libraries)."""
        if self._controller is None:
            from threadpoolctl import ThreadpoolController
            self._controller = ThreadpoolController()
        return self._controller

    @contextlib.contextmanager
    def forward(self, device: torch.device, few: bool):
        """Run one forward under the policy (see the module doc); re-entering is a no-op."""
        if device.type != "cpu":
            yield
            return
        with self._lock:
            if self._threads is not None:          # nested (a step's forward inside a step)
                yield
                return
            n = torch.get_num_threads()
            self._threads, limit = n, None
            if few:
                limit = self._blas().limit(limits=n, user_api="blas")
                torch.set_num_threads(1)
            try:
                yield
            finally:
                if few:
                    torch.set_num_threads(n)
                    limit.restore_original_limits()
                self._threads = None


POLICY = ThreadPolicy()
