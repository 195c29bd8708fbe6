"""Rank 0's calls to ranks on other hosts, through the ranks' TCPStore (launch.py): what a pipe
is to the workers an engine spawns on its own host (worker.py reads either).

    rank 0:   chan.post(cmd)            message i under "pf/m/i", every worker reads it once
              chan.said(r)              worker r's last reply ("hello", "ready", ("error", ...))
    worker:   chan.poll(t); chan.recv() the next message in order (and acks it under "pf/a/i")
              chan.send(reply)

Messages are pickled (tensors as worker.Wire: host bytes).  Rank 0 deletes a message once every
worker acked it, in batches of WINDOW.  A worker waiting for the next message sees rank 0's
death as a store error (the store lives in rank 0's process) and exits.
"""
from __future__ import annotations

import datetime
import pickle

WINDOW = 64


class StoreChannel:
    def __init__(self, store, rank: int, n: int, timeout_s: float):
        self.store, self.rank, self.n, self.timeout_s = store, rank, n, timeout_s
        self.seq = 0                  # rank 0: messages posted; a worker: messages read
        self.clean = 0                # rank 0: messages below this are deleted

    # rank 0 ----------------------------------------------------------------------------------
    def post(self, cmd) -> None:
        self.store.set(f"pf/m/{self.seq}", pickle.dumps(cmd, protocol=pickle.HIGHEST_PROTOCOL))
        self.seq += 1
        if self.seq - self.clean >= 2 * WINDOW:
            self._collect(self.seq - WINDOW)

    def _collect(self, upto: int) -> None:
        """Delete messages below ``upto`` that every worker acked (in order: stop at the first
        one some worker has not read)."""
        while self.clean < upto and self.store.add(f"pf/a/{self.clean}", 0) >= self.n - 1:
            self.store.delete_key(f"pf/m/{self.clean}")
            self.store.delete_key(f"pf/a/{self.clean}")
            self.clean += 1

    def said(self, rank: int):
        """Worker ``rank``'s last reply, or None."""
        key = f"pf/r/{rank}"
        return pickle.loads(self.store.get(key)) if self.store.check([key]) else None

    # a worker --------------------------------------------------------------------------------
    def send(self, reply) -> None:
        self.store.set(f"pf/r/{self.rank}", pickle.dumps(reply))

    def poll(self, timeout_s: float) -> bool:
        """Whether the next message is there, waiting up to ``timeout_s`` (a store error, rank 0
        gone, raises EOFError)."""
        key = f"pf/m/{self.seq}"
        try:
            if self.store.check([key]):
                return True
            self.store.wait([key], datetime.timedelta(seconds=max(timeout_s, 1e-3)))
            return True
        except RuntimeError as e:
            if "timeout" in str(e).lower() or "timed out" in str(e).lower():
                return False
            raise EOFError(f"rank 0's store is gone: {e}") from None

    def recv(self):
        key = f"pf/m/{self.seq}"
        try:
            data = self.store.get(key)
            self.store.add(f"pf/a/{self.seq}", 1)
        except RuntimeError as e:
            raise EOFError(f"rank 0's store is gone: {e}") from None
        self.seq += 1
        return pickle.loads(data)
