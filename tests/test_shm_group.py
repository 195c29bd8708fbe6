"""csrc/cpu's ShmGroup (pf_engine/parallel/shm.py): the shared-memory all-reduce of the
tensor-parallel CPU ranks.  Three processes sum random vectors longer than a round (several
rounds each) and every rank gets the float32 sum in rank order, bit for bit; a missing rank is a
timeout, an abort from another thread ends a wait at once; bad arguments are one line.
"""
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pf_kernels import cpu_ops

pytestmark = pytest.mark.skipif(not cpu_ops.cpu_available()[0], reason="csrc/cpu is not built here")

CAP = 100          # floats per round: the vectors below take 1 to 4 rounds
SIZES = [1, 37, 100, 101, 333]


def _vectors(rank: int) -> list[np.ndarray]:
    g = np.random.default_rng(rank)
    return [g.standard_normal(n).astype(np.float32) * 10 ** g.uniform(-3, 3) for n in SIZES]


def _rank(rank: int, world: int, path: str, out: str) -> None:
    from pf_engine.parallel.shm import ShmReducer
    red = ShmReducer(path, rank, world, 30.0, capacity=CAP)
    got = []
    for v in _vectors(rank):
        t = torch.from_numpy(v.copy())
        got.append(red(t).numpy().copy())
    np.savez(f"{out}.{rank}.npz", *got, rounds=red.group.rounds)


def test_three_ranks_sum_in_rank_order_bit_for_bit(tmp_path):
    from pf_engine.parallel.shm import create_segment
    world = 3
    path = create_segment(world, CAP)
    try:
        mp.start_processes(_rank, args=(world, path, str(tmp_path / "r")), nprocs=world, join=True,
                           start_method="spawn")
    finally:
        os.unlink(path)
    want = [((_vectors(0)[i] + _vectors(1)[i]) + _vectors(2)[i]) for i in range(len(SIZES))]
    for r in range(world):
        got = np.load(tmp_path / f"r.{r}.npz")
        assert int(got["rounds"]) == sum(-(-n // CAP) for n in SIZES)
        for i in range(len(SIZES)):
            assert np.array_equal(got[f"arr_{i}"], want[i]), (r, SIZES[i])
    assert not np.array_equal(want[0], _vectors(0)[0])


def _lonely(timeout_s: float):
    from pf_engine.parallel.shm import ShmReducer, create_segment
    path = create_segment(2, CAP)
    try:
        return ShmReducer(path, 0, 2, timeout_s, capacity=CAP)
    finally:
        os.unlink(path)


def test_a_missing_rank_times_out_and_the_group_stays_failed():
    red = _lonely(0.3)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="all-reduce timed out after 0.3 s waiting for rank 1"):
        red(torch.ones(8))
    assert 0.25 < time.monotonic() - t0 < 5 and red.group.aborted
    with pytest.raises(RuntimeError, match="aborted"):
        red(torch.ones(8))


def test_abort_from_another_thread_ends_a_wait():
    red = _lonely(60.0)
    threading.Timer(0.2, red.abort).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="all-reduce aborted"):
        red(torch.ones(8))
    assert time.monotonic() - t0 < 5


def test_watchdog_aborts_when_a_process_ends():
    from pf_engine.parallel.shm import Watchdog
    red = _lonely(60.0)
    p = mp.get_context("spawn").Process(target=time.sleep, args=(0.3,))
    p.start()
    dog = Watchdog(red, [p.sentinel])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="aborted"):
        red(torch.ones(8))
    assert time.monotonic() - t0 < 10
    dog.stop()
    p.join()


def test_a_stopped_watchdog_leaves_the_group_alone():
    from pf_engine.parallel.shm import Watchdog
    red = _lonely(60.0)
    dog = Watchdog(red, alive=lambda: False, poll_s=10.0)
    dog.stop()
    assert not red.group.aborted


@pytest.mark.parametrize("kw,words", [
    (dict(world=0), "world is 0, expected a value in [1, 64]"),
    (dict(rank=2), "rank is 2, expected a value in [0, 1] (world - 1)"),
    (dict(capacity=8), "capacity is 8, expected a value in [16, 1073741824]"),
    (dict(timeout_s=0.0), "timeout_s is 0, expected a positive number of seconds"),
    (dict(size=64), "segment has 64 bytes, expected at least"),
    (dict(dtype=np.float32), "segment has dtype float32, expected uint8"),
])
def test_bad_arguments_are_one_line(kw, words):
    world, cap = kw.get("world", 2), kw.get("capacity", 32)
    size = kw.get("size", cpu_ops.ShmGroup.layout_bytes(2, 32))
    seg = np.zeros(size, dtype=np.uint8)
    if "dtype" in kw:
        seg = seg.view(kw["dtype"])
    with pytest.raises((ValueError, TypeError)) as e:
        cpu_ops.ShmGroup(seg, kw.get("rank", 0), world, cap, kw.get("timeout_s", 1.0))
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_allreduce_checks_its_input():
    red = _lonely(1.0)
    with pytest.raises(TypeError, match="x has dtype float64, expected float32"):
        red.group.allreduce(np.zeros(4))
    with pytest.raises(ValueError, match="x is not writable|x is read-only|writable"):
        a = np.zeros(4, dtype=np.float32)
        a.flags.writeable = False
        red.group.allreduce(a)
    assert red.group.rounds == 0           # nothing was published
