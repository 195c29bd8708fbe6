"""The CPU thread settings around torch's OpenMP workers (backends/threads.py, pf_engine/__init__):
the short spin set before torch loads, the forwards whose products are the kernels' at one torch
thread, and the decode step's sampling inside that setting."""
import os
import subprocess
import sys

import pytest
import torch

from pf_engine import Engine
from pf_engine.runtime.runner import StepRunner

SEEN_AT_TORCH_IMPORT = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Spy())
import pf_engine
from pf_engine import Engine
"""


@pytest.mark.parametrize("env,want", [
    ({}, "3000 None"),                                  # the default, before libgomp reads it
    ({"GOMP_SPINCOUNT": "77"}, "77 None"),              # a user's count wins
    ({"OMP_WAIT_POLICY": "active"}, "None active"),     # so does a user's policy
])
def test_a_short_openmp_spin_is_set_before_torch_loads(env, want):
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", SEEN_AT_TORCH_IMPORT], env={**clean, **env},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[0] == want


@pytest.fixture(scope="module")
def engines(tiny_chat_model):
    folder, _ = tiny_chat_model
    return {q: Engine.from_pretrained(folder, backend="cpu", quantize=q) for q in (None, "q4")}


def test_own_threads_for_every_forward_of_a_model_stored_as_bytes(engines):
    fp32, q4 = engines[None].backend, engines["q4"].backend
    assert fp32.own_threads(16) and not fp32.own_threads(17)    # larger batches: torch's GEMMs
    assert q4.own_threads(16) and q4.own_threads(4096)          # every product is the kernel's


@pytest.mark.parametrize("quantize", [None, "q4"])
def test_torch_is_at_one_thread_where_the_kernels_run_and_when_sampling(engines, quantize, monkeypatch):
    """Sampling runs at one torch thread (argmax over the vocabulary would wake torch's workers,
    whose spinning then takes the kernels' cores), and so does a 4-bit model's prefill (its
    attention, csrc/cpu's through backends/cpu/attention.py, beside the kernels' products)."""
    import pf_engine.backends.cpu.attention as cpu_attention
    eng = engines[quantize]
    sampled, attended = [], []
    rows, attend = StepRunner._sample_rows, cpu_attention.attention
    monkeypatch.setattr(StepRunner, "_sample_rows", lambda self, *a: (
        sampled.append(torch.get_num_threads()), rows(self, *a))[1])
    monkeypatch.setattr(cpu_attention, "attention", lambda *a, **k: (
        attended.append(torch.get_num_threads()), attend(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng.generate([list(range(5, 45))], max_new_tokens=6)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(sampled) == 6 and set(sampled) == {1}
    assert attended and set(attended) == {2 if quantize is None else 1}    # the 40-token prefill


def test_two_engines_forwards_do_not_wait_for_each_other():
    """Each backend has its own policy and a policy's state is per thread: a forward entered in
    one thread (holding it open) does not stop another thread's forward, of another engine's
    policy or of the same one; each sees its own caller's count; the BLAS limit is put back
    when the last one leaves."""
    import threading

    from pf_engine.backends.threads import BLAS, ThreadPolicy
    a, b = ThreadPolicy(), ThreadPolicy()
    cpu = torch.device("cpu")
    inside, release, seen = threading.Event(), threading.Event(), {}

    def hold():
        torch.set_num_threads(2)
        with a.forward(cpu, True):
            seen["hold"] = a.threads(), torch.get_num_threads()
            inside.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert inside.wait(30)
    for policy in (b, a):
        done = threading.Event()

        def other(policy=policy, done=done):
            torch.set_num_threads(3)
            with policy.forward(cpu, True):
                seen[id(done)] = policy.threads(), torch.get_num_threads()
            done.set()

        u = threading.Thread(target=other)
        u.start()
        assert done.wait(10), "a forward waited for another thread's forward"
        u.join()
        assert seen[id(done)] == (3, 1)
    assert BLAS.users == 1
    release.set()
    t.join()
    assert seen["hold"] == (2, 1) and BLAS.users == 0 and BLAS.limit is None
