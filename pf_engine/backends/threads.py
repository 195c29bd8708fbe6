"""The CPU thread settings of a forward: a policy per backend (so per engine), entered by every
forward on CPU.

A forward with few rows (a decode step: at most ``backend.few_rows``; on the cpu backend any
forward of a model stored as bytes, ``backend.own_threads``) runs its products in the
backend's own threads (csrc/cpu's pool, or numpy's BLAS for one row on the torch backend) with
the caller's thread count, and torch itself at one thread: torch's OpenMP workers would
otherwise spin between their small ops and starve the kernel's threads on the same cores.
Forwards with more rows (prefill, scoring) use torch's GEMMs with its threads as set.

``policy.forward(device, few)`` is a context: it records the caller's thread count
(``threads()``, what the kernels are given), sets torch and BLAS for the mode, and puts
everything back on exit.  The caller's count is torch's ``get_num_threads()`` as found at entry
(``pf-generate --threads N`` sets it).  What it records is the calling thread's own (torch's
thread count is per thread too), so forwards in different threads, of one engine or of two,
never wait for each other here (csrc/cpu's pool runs a second caller's job inline).  The BLAS
limit is the process's: the first forward in sets it, the last out restores it.
"""
from __future__ import annotations

import contextlib
import threading

import torch


class _Blas:
    """The process's BLAS thread limit (threadpoolctl), shared by every policy: counted."""

    def __init__(self):
        self.lock, self.users, self.limit, self.controller = threading.Lock(), 0, None, None

    def enter(self, n: int) -> None:
        with self.lock:
            if self.users == 0:
                if self.controller is None:    # one per process: making one scans the libraries
                    from threadpoolctl import ThreadpoolController
                    self.controller = ThreadpoolController()
                self.limit = self.controller.limit(limits=n, user_api="blas")
            self.users += 1

    def exit(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                self.limit.restore_original_limits()
                self.limit = None


BLAS = _Blas()


class ThreadPolicy:
    """One backend's policy; see the module doc."""

    def __init__(self):
        self._local = threading.local()          # .threads: the caller's count, in a forward

    def threads(self) -> int:
        """The thread count the backend's kernels use: the caller's, even while torch is at 1."""
        return getattr(self._local, "threads", None) or torch.get_num_threads()

    @contextlib.contextmanager
    def forward(self, device: torch.device, few: bool):
        """Run one forward under the policy (see the module doc); re-entering is a no-op."""
        local = self._local
        if device.type != "cpu" or getattr(local, "threads", None) is not None:
            yield                                  # on a GPU, or nested (a step's forward)
            return
        n = torch.get_num_threads()
        if few:
            BLAS.enter(n)
        local.threads = n
        try:
            if few:
                torch.set_num_threads(1)
            yield
        finally:
            if few:
                torch.set_num_threads(n)
                BLAS.exit()
            local.threads = None
