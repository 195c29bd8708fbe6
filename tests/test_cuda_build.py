"""csrc/cuda/ builds with nvcc for sm_80 and sm_90 into a temporary folder (skipped without nvcc).

The build takes ~30 s on two cores.  Only the compile and the module's Python surface are checked
here; running the kernel needs a GPU (tests/test_kernels.py::test_cuda_kernel_*).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _builder():
    spec = importlib.util.spec_from_file_location("pf_csrc_build", ROOT / "csrc" / "cuda" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


builder = _builder()
needs_nvcc = pytest.mark.skipif(builder.find_nvcc() is None, reason="nvcc not found")


def test_nvcc_command_targets_sm80_and_sm90(tmp_path):
    cmd = " ".join(builder.nvcc_command("nvcc", tmp_path / "m.so"))
    assert "-gencode arch=compute_80,code=sm_80" in cmd and "-gencode arch=compute_90,code=sm_90" in cmd
    assert "-gencode arch=compute_90,code=compute_90" in cmd       # PTX for newer GPUs
    assert "grouped_lora.cu" in cmd and "binding.cpp" in cmd
    assert builder.output_path(tmp_path).name.startswith("_pf_cuda")


@needs_nvcc
def test_build_produces_importable_module(tmp_path):
    out = builder.build(tmp_path, archs=("80", "90"), quiet=True)
    assert out.exists() and out.parent == tmp_path and out.name.startswith("_pf_cuda") and out.suffix == ".so"
    assert not list(tmp_path.glob("*.tmp"))
    # Import it in a fresh interpreter (not into this process's pf_kernels) and poke the boundary.
    script = textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("_pf_cuda", {str(out)!r})
        m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
        assert m.MAX_TOKENS_PER_LAUNCH == 16 and m.MAX_EXPERTS == 64
        try:
            n = m.device_count()
            print("DEVICES", n)
        except RuntimeError as e:
            assert "cudaGetDeviceCount" in str(e), e
            print("NO-CUDA", e)
        for bad, expect in ((dict(dtype=7), "no kernel for dtype code=7"),
                            (dict(ro=[0, 8, 4]), "rank_offsets decreases")):
            try:
                m.grouped_lora(0, 0, 0, 0, 0, 0, 0, 1, 64, 64, bad.get("ro", [0, 8]), 64, 64, 64, 8, 1,
                               bad.get("dtype", 1), 0, 0)
            except RuntimeError as e:
                assert expect in str(e), e
            else:
                raise AssertionError("no error for " + repr(bad))
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_build_without_nvcc_raises_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "find_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="nvcc not found"):
        builder.build(tmp_path)


@pytest.mark.parametrize("cap, ok", [((7, 5), False), ((8, 0), True), ((8, 9), True),
                                     ((9, 0), True), ((12, 0), True)])
def test_cuda_backend_checks_compute_capability(monkeypatch, cap, ok):
    """The kernel is sm_80/sm_90 SASS + compute_90 PTX: older GPUs fall back, with the reason."""
    import torch

    from pf_kernels import cuda_ops

    class FakeModule:
        @staticmethod
        def device_count():
            return 1
    monkeypatch.setattr(cuda_ops, "_load", lambda: (FakeModule, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    usable, why = cuda_ops.cuda_available()
    assert usable == ok
    if not ok:
        assert f"compute capability {cap[0]}.{cap[1]} is below 8.0" in why
