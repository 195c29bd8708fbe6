"""The instruction-set variants of the block formats' dots, the 16-bit dots and the q8 experts' expand
(csrc/cpu/isa.h): the choice, the
one-line errors, bit-identical outputs across every variant this CPU runs, and build.py's check
that a variant's object keeps its code to its own namespace.

A variant the CPU lacks cannot run here: its comparison is skipped, with the reason, and runs on
a machine that has it (the AVX-512 VNNI Xeons some of these machines are)."""
import os
import re
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


def _outputs(fmt, T, tiles=False, O=67, d_in=None, threads=2):
    """A random W in ``fmt`` against T random tokens; a bf16 W on AMX-BF16 tiles only with
    ``tiles`` (their sums are not the dots': test_bf16_tiles_*)."""
    rng = np.random.default_rng([T, len(fmt), O])
    d_in = d_in or (544 if FORMATS[fmt].qk == 32 else 768)
    w = rng.standard_normal((O, d_in)).astype(np.float32)
    plan = cpu_ops.LinearPlan(repack(gguf_rows(w, fmt), FORMATS[fmt], d_in), O,
                              fmt=FORMATS[fmt].code, d_in=d_in)
    plan.bf16_tiles = tiles
    x = rng.standard_normal((T, d_in)).astype(np.float32)
    if tiles:                     # every third value halfway between two bf16s: ties go to even
        u = x.view(np.uint32)
        u[:, ::3] = (u[:, ::3] & 0xFFFF0000) | 0x8000
    y = np.empty((T, O), np.float32)
    plan.run(x, y, threads=threads)
    return (y, w, x) if tiles else y


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
            want = re.escape(f"isa '{name}' needs {needs}, which this CPU lacks")  # "5.16+)"
            with pytest.raises(ValueError, match=want):
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


def _with_tiles():
    """Switch to the amx variant; skip where a bf16 W's prefill has no AMX-BF16 tiles."""
    if not {name: ok for name, _, ok in cpu_ops.isas()}.get("amx"):
        pytest.skip("amx is not built or this CPU lacks it")
    cpu_ops.set_isa("amx")
    if not cpu_ops.bf16_tiles():
        pytest.skip("this CPU lacks AMX-BF16")


SHAPES = [(67, 544), (5, 32), (33, 96), (300, 1024), (16, 64)]   # rows: not 16s, < 16, 32 + 1


@pytest.mark.parametrize("O,d_in", SHAPES)
def test_bf16_tiles_against_the_fp64_reference_of_bf16_activations(O, d_in):
    """csrc/cpu/amx_bf16.h: y = W . bf16(x) with fp32 sums, at rows and tokens not multiples of
    16 (fails if x is truncated to bf16 rather than rounded, or a tile reads the wrong rows)."""
    from test_quant import bf16_round
    before = cpu_ops.isa()
    try:
        _with_tiles()
        for T in (6, 16, 17, 40):
            y, w, x = _outputs("bf16", T, tiles=True, O=O, d_in=d_in)
            ref = bf16_round(x) @ bf16_round(w).T
            assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max(), (O, d_in, T)
    finally:
        cpu_ops.set_isa(before)


def test_bf16_tiles_give_each_token_its_own_outputs_among_tiled_calls():
    """Every call of 6 or more tokens takes the tiles, whose elements are each their row's and
    token's: a token's outputs are the same in a call of 6, 16, 17 or 40 tokens, on 1 or 2
    threads (and bf16_tiles = False gives the baseline's dots, bit for bit)."""
    before = cpu_ops.isa()
    try:
        _with_tiles()
        rng = np.random.default_rng(5)
        O, d_in = 83, 544
        w = rng.standard_normal((O, d_in)).astype(np.float32)
        plan = cpu_ops.LinearPlan(repack(gguf_rows(w, "bf16"), FORMATS["bf16"], d_in), O,
                                  fmt=FORMATS["bf16"].code, d_in=d_in)
        x = rng.standard_normal((40, d_in)).astype(np.float32)

        def run(T, threads=2):
            y = np.empty((T, O), np.float32)
            plan.run(x[:T], y, threads=threads)
            return y
        full = run(40)
        for T in (6, 16, 17):
            assert np.array_equal(run(T), full[:T]), T
        assert np.array_equal(run(40, threads=1), full)
        plan.bf16_tiles = False
        dots = run(40)
        assert not np.array_equal(dots, full)          # the tiles' sums are their own
        cpu_ops.set_isa("avx2")
        assert np.array_equal(run(40), dots)
    finally:
        cpu_ops.set_isa(before)
