"""Without csrc/cpu's extension (not built, or a CPU it cannot run on: an ARM laptop), the engine
still imports and runs on the torch backend; asking for the cpu backend is one line.  In a
process of its own whose import of pf_kernels._pf_cpu fails."""
import subprocess
import sys

SCRIPT = """
import sys
sys.modules["pf_kernels._pf_cpu"] = None             # as if it were never built
from pf_engine import Engine, PFError
eng = Engine.from_pretrained(sys.argv[1], device="cpu", progress=False)
assert eng.backend.name == "torch", eng.backend.name
out = eng.generate([[1, 5, 9]], max_new_tokens=4)[0]
assert len(out.token_ids) == 4
try:
    Engine.from_pretrained(sys.argv[1], device="cpu", backend="cpu", progress=False)
except PFError as e:
    assert "\\n" not in str(e) and "extension" in str(e), str(e)
else:
    raise AssertionError("the cpu backend without its extension")
print("ok")
"""


def test_the_engine_runs_without_the_cpu_extension(hf_model_dir):
    folder, _ = hf_model_dir("llama", "no_ext")
    r = subprocess.run([sys.executable, "-c", SCRIPT, folder], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_a_build_out_of_step_with_the_engine_is_named(monkeypatch):
    import pytest
    import torch

    from pf_engine.backends import backend_status
    from pf_engine.backends.cpu import Cpu, kernel
    if not backend_status("cpu", torch.device("cpu"))[0]:
        pytest.skip("the CPU extension is not built here")
    Cpu(torch.device("cpu"))                                      # in step: fine
    monkeypatch.setattr(kernel, "MAX_ROWS", 8)
    with pytest.raises(RuntimeError, match="MAX_ROWS=16, this engine 8: rebuild"):
        Cpu(torch.device("cpu"))
