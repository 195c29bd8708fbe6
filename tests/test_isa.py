"""The instruction-set variants of the block formats' dots, the 16-bit dots and the q8 experts' expand
(csrc/cpu/isa.h): the choice, the
one-line errors, bit-identical outputs across every variant this CPU runs, and build.py's check
that a variant's object keeps its code to its own namespace.

A variant the CPU lacks cannot run here: its comparison is skipped, with the reason, and runs on
a machine that has it (the AVX-512 VNNI Xeons some of these machines are)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pf_kernels import cpu_ops
from kquants import gguf_rows
from pf_kernels.quant import FORMATS, quantize, repack

OK, WHY = cpu_ops.cpu_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"csrc/cpu unavailable: {WHY}")
VARIANTS = ["amx", "avx512vnni", "avxvnni", "avx2"]
ROOT = Path(__file__).resolve().parent.parent


def test_the_best_supported_variant_is_in_use():
    table = cpu_ops.isas()
    assert [name for name, _, _ in table] == [v for v in VARIANTS if v in {n for n, _, _ in table}]
    assert table[-1][0] == "avx2" and table[-1][2]
    if not os.environ.get("PF_CPU_ISA"):
        assert cpu_ops.isa() == next(name for name, _, ok in table if ok)


def _outputs(fmt, T):
    rng = np.random.default_rng([T, len(fmt)])
    O, d_in = 67, 544 if FORMATS[fmt].qk == 32 else 768
    w = rng.standard_normal((O, d_in)).astype(np.float32)
    plan = cpu_ops.LinearPlan(repack(gguf_rows(w, fmt), FORMATS[fmt], d_in), O,
                              fmt=FORMATS[fmt].code, d_in=d_in)
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    y = np.empty((T, O), np.float32)
    plan.run(x, y, threads=2)
    return y


def _expert_outputs(T):
    """A q4_1 W with q8 experts (pass 1's A_cat rows and the expand's panels, expand_q8.h)."""
    from test_cpu_binding import make_gates
    from test_expert_formats import Experts
    rng = np.random.default_rng([T, 8])
    ex = Experts(rng, 96, (41, 23, 77), 5, "q8")
    W = ex.g.w_aug[:ex.g.d_out]
    plan = ex.plan(repack(quantize(W, FORMATS["q4_1"]), FORMATS["q4_1"], 96), "q4_1")
    x = rng.standard_normal((T, 96)).astype(np.float32)
    y = np.empty((T, ex.g.d_out), np.float32)
    plan.run(x, y, make_gates("dense", rng, T, 5), threads=2)
    return y


@pytest.mark.parametrize("variant", VARIANTS[:-1])
def test_every_variant_gives_the_baselines_bits(variant):
    support = {name: ok for name, _, ok in cpu_ops.isas()}
    if not support.get(variant):
        pytest.skip(f"{variant} is {'not built' if variant not in support else 'not supported by this CPU'}")
    before = cpu_ops.isa()
    try:
        for fmt in (*sorted(FORMATS), "q8 experts"):
            run = _expert_outputs if fmt == "q8 experts" else lambda T: _outputs(fmt, T)
            for T in (1, 3, 5, 6, 16, 40):
                cpu_ops.set_isa("avx2")
                base = run(T)
                cpu_ops.set_isa(variant)
                assert cpu_ops.isa() == variant
                assert np.array_equal(run(T), base), (fmt, T)
    finally:
        cpu_ops.set_isa(before)


def test_set_isa_names_what_is_wrong_in_one_line():
    with pytest.raises(ValueError) as e:
        cpu_ops.set_isa("sse2")
    msg = str(e.value)
    assert "\n" not in msg and "'sse2'" in msg and "avx2" in msg, msg
    for name, needs, ok in cpu_ops.isas():
        if not ok:
            with pytest.raises(ValueError, match=f"isa '{name}' needs {needs}, which this CPU lacks"):
                cpu_ops.set_isa(name)
    assert cpu_ops.isa() in VARIANTS


def test_pf_cpu_isa_picks_the_variant_and_a_bad_one_is_one_line():
    code = "from pf_kernels import cpu_ops; print(cpu_ops.isa())"
    env = dict(os.environ, PF_CPU_ISA="avx2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "avx2", out.stderr
    env["PF_CPU_ISA"] = "avx9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("ValueError: PF_CPU_ISA='avx9': isa 'avx9': expected one of"), last


def test_build_refuses_a_variant_object_with_symbols_outside_its_namespace():
    sys.path.insert(0, str(ROOT / "csrc" / "cpu"))
    try:
        import build
    finally:
        sys.path.pop(0)
    variant = build.OBJ_DIR / "quant_dots_avx2.o"
    other = build.OBJ_DIR / "linear_plan.o"
    if not (variant.exists() and other.exists()):
        pytest.skip("csrc/build/cpu has no objects (the module was built elsewhere)")
    build._check_namespace(variant, "avx2")
    with pytest.raises(RuntimeError, match="linear_plan.o defines symbols outside pf_cpu::avx2::"):
        build._check_namespace(other, "avx2")
