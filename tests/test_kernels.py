"""pf_kernels: Triton kernels (interpreted on CPU, compiled on a GPU), routing metadata, launcher
errors, the CUDA loader's fallback, and GPU-only checks (skipped without a GPU).

TRITON_INTERPRET: triton decides jit-vs-interpret when a kernel is *decorated*, so a module that
decorates at import would be frozen by whoever imported it first (another test file may already
have imported triton and pf_kernels).  pf_kernels jits each kernel lazily for the mode current at
*launch* (ops.LazyKernel reads triton.knobs.runtime.interpret, i.e. the environment, each launch),
so the CPU tests just set TRITON_INTERPRET=1 per test with monkeypatch (``interp`` fixture) and
the GPU tests set it to 0; test_import_order_does_not_matter proves it in a fresh interpreter.

Coverage: the full grid T x d_in x d_out x ranks x K x gates x dtype (3,240 cases) would take an
hour in the interpreter, so CASES is a pairwise-covering subset (every pair of values of any two
factors appears in some case; test_cases_cover_all_pairs checks it), each run through both
grouped_lora (T <= 16: one-launch path; T > 16: shrink + expand) and fused_linear.
"""
from __future__ import annotations

import functools
import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pf_kernels
from pf_kernels import LoRAMeta, cuda_ops, fused_linear, grouped_lora
from pf_kernels import ops as pf_ops
from pf_kernels.reference import fused_linear_ref, grouped_lora_loop_ref, grouped_lora_ref

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (torch.cuda.is_available() is False)")

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_RANKS = (16, 8, 32, 4, 12)

FACTORS = dict(T=[1, 3, 17, 133], d_in=[64, 111, 576], d_out=[64, 111, 576], ranks=["8", "16", "mixed"],
               K=[1, 4, 10], gates=["dense", "top2", "zero_rows", "one_expert", "skewed"],
               dtype=["fp32", "fp16", "bf16"])
# Pairwise-covering subset of FACTORS (greedy, cheapest case first among equals).
CASES = [
    (1, 64, 64, "8", 1, "dense", "fp32"),
    (3, 64, 111, "16", 4, "top2", "fp16"),
    (3, 111, 64, "mixed", 10, "zero_rows", "bf16"),
    (17, 576, 576, "8", 4, "one_expert", "bf16"),
    (133, 111, 576, "16", 1, "skewed", "fp32"),
    (1, 576, 111, "mixed", 10, "skewed", "fp16"),
    (17, 111, 111, "8", 1, "zero_rows", "fp16"),
    (17, 64, 576, "mixed", 10, "top2", "fp32"),
    (133, 576, 64, "16", 1, "top2", "bf16"),
    (133, 64, 64, "mixed", 4, "one_expert", "fp16"),
    (1, 111, 111, "16", 4, "dense", "bf16"),
    (3, 576, 111, "8", 1, "one_expert", "fp32"),
    (133, 576, 576, "8", 10, "dense", "fp16"),
    (17, 64, 64, "8", 4, "skewed", "bf16"),
    (1, 64, 576, "16", 4, "zero_rows", "fp32"),
    (1, 111, 64, "16", 10, "one_expert", "fp32"),
    (3, 64, 576, "mixed", 1, "dense", "fp32"),
    (1, 111, 64, "8", 1, "top2", "fp32"),
    (133, 576, 111, "8", 1, "zero_rows", "fp32"),
    (17, 64, 64, "16", 1, "dense", "fp32"),
    (3, 64, 64, "8", 1, "skewed", "fp32"),
]


def case_id(c) -> str:
    return "T{}-din{}-dout{}-r{}-K{}-{}-{}".format(*c)


INTERPRETER_PROBE = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, triton, triton.language as tl

    @triton.jit
    def count(x_ptr, n):
        for i in range(n):
            tl.store(x_ptr + i, i)

    x = torch.zeros(3, dtype=torch.int32)
    count[(1,)](x, 3)
    assert x.tolist() == [0, 1, 2], x
""")


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    """None when this Triton's CPU interpreter runs a loop over an int argument, else why not.

    Triton 3.6's interpreter turns int arguments into 1-element arrays and calls int() on them,
    which numpy >= 2.5 refuses (the GPU image pairs those two): nothing our kernels can change.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_PROBE], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode == 0:
        return None
    import numpy
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return (f"triton {triton.__version__}'s interpreter fails a loop over an int argument with "
            f"numpy {numpy.__version__} ({last[:160]})")


@pytest.fixture
def interp(monkeypatch):
    """Run Triton kernels in the CPU interpreter for this test (read by pf_kernels at launch)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled(monkeypatch):
    """Compile Triton kernels for the GPU in this test."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    from pf_kernels import _triton_kernels as tk
    if not tk.can_compile():
        pytest.skip("triton was imported with TRITON_INTERPRET=1: its library functions are "
                    "interpreted in this process, so no kernel can compile here")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def seed():
    """A fresh seed each run, printed by the assertions' messages when a check fails."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


# --------------------------------------------------------------------------------------------
# inputs


def make_gates(kind: str, T: int, K: int, device="cpu") -> torch.Tensor:
    """Gates [T, K] fp32 of a routing pattern: dense, top2, zero_rows, one_expert, skewed."""
    g = torch.rand(T, K, device=device) + 0.05
    if kind == "dense":
        return g
    if kind in ("top2", "zero_rows"):
        keep = torch.zeros_like(g).scatter_(1, g.topk(min(2, K), dim=1).indices, 1.0)
        g = g * keep
        if kind == "zero_rows":
            g[::3] = 0.0                     # rows 0, 3, 6, ...: tokens that use no expert
        return g
    if kind == "one_expert":                 # every token on the last expert, the rest idle
        out = torch.zeros_like(g)
        out[:, K - 1] = g[:, K - 1]
        return out
    if kind == "skewed":                     # ~80% of tokens on expert 0 alone, the rest top-2
        keep = torch.zeros_like(g).scatter_(1, g.topk(min(2, K), dim=1).indices, 1.0)
        lone = torch.rand(T, device=device) < 0.8
        keep[lone] = 0.0
        keep[lone, 0] = 1.0
        return g * keep
    raise ValueError(kind)


def make_problem(T, d_in, d_out, ranks, K, gates, dtype, device="cpu"):
    """Random x, W, A_cat, B_cat, bias, gates, rank_offsets, scalings, scaled so |delta| ~ |x W^T|."""
    if isinstance(ranks, str):
        ranks = [int(ranks)] * K if ranks != "mixed" else [MIXED_RANKS[k % len(MIXED_RANKS)] for k in range(K)]
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    R = offsets[-1]
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    x = torch.randn(T, d_in, device=device).to(dt)
    w = (torch.randn(d_out, d_in, device=device) / d_in ** 0.5).to(dt)
    a_cat = (torch.randn(R, d_in, device=device) / d_in ** 0.5).to(dt)
    b_cat = (torch.randn(d_out, R, device=device) / max(ranks) ** 0.5).to(dt)
    bias = torch.randn(d_out, device=device).to(dt)
    return dict(x=x, w=w, a_cat=a_cat, b_cat=b_cat, bias=bias,
                gates=make_gates(gates, T, K, device), rank_offsets=torch.tensor(offsets, dtype=torch.int32),
                scalings=(torch.rand(K, device=device) + 0.5))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, seed: int, what: str):
    """max |out - ref| <= tol(dtype) * max |ref|, ref in fp64."""
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (poison not overwritten?) seed={seed}"
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    assert err <= TOL[dtype] * scale, (f"{what}: max error {err:.3e} > {TOL[dtype]:.0e} * max|ref| "
                                       f"{scale:.3e} (seed={seed})")


def check_grouped(p, seed, meta=None, what="grouped_lora"):
    y0 = torch.randn(p["x"].shape[0], p["b_cat"].shape[0], device=p["x"].device).to(p["x"].dtype)
    y = y0.clone()
    out = grouped_lora(y, p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"], meta=meta)
    assert out is y
    ref = y0.double() + grouped_lora_ref(p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"],
                                         p["scalings"])
    assert_close(y, ref, p["x"].dtype, seed, what)


def check_fused(p, seed, meta=None, bias=True, what="fused_linear"):
    T, d_out = p["x"].shape[0], p["w"].shape[0]
    w_aug = torch.cat([p["w"], p["a_cat"]])                                     # (d_out + R, d_in)
    b = p["bias"] if bias else None
    out = torch.full((T, d_out), float("nan"), device=p["x"].device, dtype=p["x"].dtype)   # poisoned
    y = fused_linear(p["x"], w_aug, p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"], d_out,
                     bias=b, meta=meta, out=out)
    assert y is out
    ref = fused_linear_ref(p["x"], w_aug, p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"], d_out, b)
    assert_close(y, ref, p["x"].dtype, seed, what)


# --------------------------------------------------------------------------------------------
# reference and metadata (no triton)


def test_cases_cover_all_pairs():
    names = list(FACTORS)
    for i, j in itertools.combinations(range(len(names)), 2):
        seen = {(c[i], c[j]) for c in CASES}
        for a, b in itertools.product(FACTORS[names[i]], FACTORS[names[j]]):
            assert (a, b) in seen, f"no case has {names[i]}={a} with {names[j]}={b}"


def test_reference_matches_loop(seed):
    p = make_problem(7, 40, 30, "mixed", 5, "top2", torch.float64)
    a = grouped_lora_ref(p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"])
    b = grouped_lora_loop_ref(p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"])
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")


def test_meta_worked_example():
    """The example in meta.py's docstring, value for value."""
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.7, 0.3, 0.0]])
    meta = LoRAMeta.build(gates, [0, 8, 24, 32], torch.tensor([2.0, 1.0, 2.0]))
    assert (meta.num_tokens, meta.num_experts, meta.total_rank, meta.max_rank) == (4, 3, 32, 16)
    assert meta.num_tokens_per_expert.tolist() == [3, 2, 1]
    assert meta.expert_start.tolist() == [0, 3, 5, 6]
    assert meta.sorted_token_ids.tolist() == [0, 2, 3, 0, 3, 2] + [-1] * 6
    torch.testing.assert_close(meta.pair_weights, torch.tensor([1.2, 1.0, 1.4, 0.4, 0.3, 1.0] + [0.0] * 6))
    assert meta.active_expert_ids.tolist() == [0, 1, 2]
    assert meta.num_active_experts.tolist() == [3]
    assert meta.expert_of_rank.tolist() == [0] * 8 + [1] * 16 + [2] * 8


def test_meta_refill_in_place_matches_build():
    offsets, scal = [0, 4, 12, 16, 20], torch.rand(4) + 0.5
    meta = LoRAMeta.build(make_gates("top2", 9, 4), offsets, scal)
    ptrs = [t.data_ptr() for t in (meta.sorted_token_ids, meta.pair_weights, meta.expert_start)]
    g2 = make_gates("one_expert", 9, 4)
    meta.refill_(g2)
    fresh = LoRAMeta.build(g2, offsets, scal)
    assert ptrs == [t.data_ptr() for t in (meta.sorted_token_ids, meta.pair_weights, meta.expert_start)]
    for name in ("sorted_token_ids", "pair_weights", "num_tokens_per_expert", "expert_start",
                 "active_expert_ids", "num_active_experts"):
        assert torch.equal(getattr(meta, name), getattr(fresh, name)), name
    assert meta.active_expert_ids.tolist() == [3, -1, -1, -1]
    with pytest.raises(ValueError, match=r"gates has shape \(8, 4\) but this LoRAMeta was built for \(9, 4\)"):
        meta.refill_(torch.zeros(8, 4))


# --------------------------------------------------------------------------------------------
# Triton kernels in the interpreter


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernels_match_reference(interp, seed, case):
    p = make_problem(*case)
    check_grouped(p, seed)
    check_fused(p, seed, bias=case[0] % 2 == 1)      # odd T with a bias, even T without


def test_meta_reused_across_calls(interp, seed):
    """One LoRAMeta per step serves every layer (prefill path, fused_linear)."""
    p = make_problem(40, 96, 80, "mixed", 6, "top2", torch.float32)
    meta = LoRAMeta.build(p["gates"], p["rank_offsets"], p["scalings"])
    for _ in range(2):
        check_grouped(p, seed, meta=meta)
        check_fused(p, seed, meta=meta)


def test_all_zero_gates_leave_y_bit_identical(interp):
    for T in (2, 20):                                 # decode and prefill paths
        p = make_problem(T, 64, 48, "16", 3, "dense", torch.bfloat16)
        p["gates"].zero_()
        y0 = torch.randn(T, 48).to(torch.bfloat16)
        y = y0.clone()
        grouped_lora(y, p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"])
        assert torch.equal(y, y0)


def test_bf16_outputs_round_to_nearest_as_on_a_gpu(interp):
    """Every bf16 store rounds its fp32 value to nearest (ties to even), as a GPU's cast does;
    the interpreter's own cast truncates.  The sums below are exact in fp32 and lie 3/4 of a bf16
    step above 1.0 (step 2^-7), so truncation would give 1.0 and rounding gives 1 + 2^-7."""
    up, step = 3 * 2.0 ** -9, 2.0 ** -7
    bf = torch.bfloat16
    for T in (2, 20):                               # decode (one launch) and prefill paths
        x = torch.zeros(T, 32, dtype=bf)
        x[:, 0] = 1.0
        x[:, 1] = up
        a_cat = torch.zeros(16, 32, dtype=bf)
        a_cat[0, 0] = 1.0                           # h[:, 0] = x[:, 0] = 1
        b_cat = torch.full((24, 16), up, dtype=bf)  # delta = 1 * up on every output
        gates, offsets, scal = torch.ones(T, 1), [0, 16], torch.ones(1)
        y = torch.ones(T, 24, dtype=bf)
        grouped_lora(y, x, a_cat, b_cat, gates, offsets, scal)
        assert torch.all(y == 1 + step), f"grouped_lora T={T}: {y[0, :4].tolist()}"
        w = torch.zeros(24, 32, dtype=bf)
        w[:, 0] = w[:, 1] = 1.0                     # base: 1 + up; the bank adds nothing
        out = fused_linear(x, torch.cat([w, a_cat]), b_cat, torch.zeros(T, 1), offsets, scal, 24)
        assert torch.all(out == 1 + step), f"fused_linear T={T}: {out[0, :4].tolist()}"


def test_edge_sizes(interp, seed):
    """No tokens; an expert of rank 0 between two others; a bank with no rank rows at all."""
    for T in (0, 2, 20):
        p = make_problem(T, 32, 24, "8", 3, "dense", torch.float32)
        p["rank_offsets"] = torch.tensor([0, 8, 8, 16], dtype=torch.int32)            # expert 1: rank 0
        p["a_cat"], p["b_cat"] = p["a_cat"][:16], p["b_cat"][:, :16]
        check_grouped(p, seed, what=f"grouped_lora rank-0 expert T={T}")
        check_fused(p, seed, what=f"fused_linear rank-0 expert T={T}")
        q = dict(p, a_cat=p["a_cat"][:0], b_cat=p["b_cat"][:, :0], gates=p["gates"][:, :1],
                 rank_offsets=[0, 0], scalings=p["scalings"][:1])
        check_grouped(q, seed, what=f"grouped_lora R=0 T={T}")
        check_fused(q, seed, what=f"fused_linear R=0 T={T}")


def test_strided_inputs(interp, seed):
    """Row-strided x and y, a transposed b_cat view, column-strided gates."""
    for T in (5, 37):
        p = make_problem(T, 70, 90, "mixed", 4, "top2", torch.float32)
        x = torch.zeros(T, 100)
        x[:, 3:73] = p["x"]
        b_t = p["b_cat"].t().contiguous()                                       # (R, d_out)
        g = torch.zeros(T, 8)
        g[:, ::2] = p["gates"]
        q = dict(p, x=x[:, 3:73], b_cat=b_t.t(), gates=g[:, ::2])
        assert not q["x"].is_contiguous() and not q["b_cat"].is_contiguous() and not q["gates"].is_contiguous()
        check_grouped(q, seed, what=f"grouped_lora strided T={T}")
        check_fused(q, seed, what=f"fused_linear strided T={T}")
        y0 = torch.randn(T, 90)
        big = torch.zeros(T, 120)
        big[:, 10:100] = y0
        grouped_lora(big[:, 10:100], q["x"], q["a_cat"], q["b_cat"], q["gates"], q["rank_offsets"], q["scalings"])
        ref = y0.double() + grouped_lora_ref(p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"],
                                             p["scalings"])
        assert_close(big[:, 10:100], ref, torch.float32, seed, "strided y")
        assert big[:, :10].abs().sum() == 0 and big[:, 100:].abs().sum() == 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_block_sizes_in_interpreter(interp, seed, monkeypatch, dtype):
    """The GPU's small blocks (several token, column and d_in blocks per program grid)."""
    gpu = pf_ops.block_config
    monkeypatch.setattr(pf_ops, "block_config",
                        lambda kind, T, d_in, d_out, interpret, esize=2: gpu(kind, T, d_in, d_out, False, esize))
    for T in (5, 70):
        p = make_problem(T, 200, 300, "mixed", 5, "zero_rows", dtype)
        check_grouped(p, seed, what=f"grouped_lora gpu blocks T={T}")
        check_fused(p, seed, what=f"fused_linear gpu blocks T={T}")


def test_import_order_does_not_matter(tmp_path):
    """triton and pf_kernels imported with TRITON_INTERPRET unset, the variable set afterwards."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    if interpreter_problem():
        pytest.skip(interpreter_problem())
    script = textwrap.dedent("""
        import os, torch, triton, pf_kernels
        from pf_kernels.reference import grouped_lora_ref
        os.environ["TRITON_INTERPRET"] = "1"
        x, a, b = torch.randn(20, 32), torch.randn(16, 32), torch.randn(24, 16)
        g, s = torch.rand(20, 2), torch.ones(2)
        y = torch.zeros(20, 24)
        pf_kernels.grouped_lora(y, x, a, b, g, [0, 8, 16], s)
        err = (y.double() - grouped_lora_ref(x, a, b, g, [0, 8, 16], s)).abs().max().item()
        print("ERR", err)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = float(proc.stdout.split("ERR")[1])
    assert err < 1e-3


def _compile_for_gpu(fn, pointers: dict, constexprs: dict, arch: int, num_warps: int = 4,
                     num_stages: int = 3):
    """triton.compile for a CUDA target without a GPU: the compiled path's types and shapes."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    params = list(inspect.signature(fn).parameters)
    sig = {p: ("constexpr" if p in constexprs else pointers[p] if p.endswith("_ptr")
               else "i64" if p.startswith("stride") else "i32") for p in params}
    from pf_kernels import _triton_kernels as tk
    src = ASTSource(tk.jitted(fn, interpret=False), sig,
                    constexprs={(params.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


@pytest.mark.parametrize("T", [5, 40])               # the one-launch path and shrink + expand
def test_ranks_above_the_rank_tile(interp, seed, T):
    """Experts of rank above BR_MAX are walked in rank chunks (bounded tiles), not dropped."""
    ranks = [pf_ops.BR_MAX + 36, 16, 2 * pf_ops.BR_MAX + 3]
    assert pf_ops.rank_tile(max(ranks)) == pf_ops.BR_MAX
    p = make_problem(T, 96, 80, ranks, 3, "dense", "fp32")
    check_grouped(p, seed)
    check_fused(p, seed)


def _smem_builds(dtype: str, br: int):
    """(kernel, pointer types, constexprs) for every GPU configuration block_config can return."""
    from pf_kernels import _triton_kernels as tk
    p, i32, f32 = f"*{dtype}", "*i32", "*fp32"
    es = DTYPES[dtype].itemsize
    flags = dict(INTERP_BF16=False, PREC="ieee" if dtype == "fp32" else "tf32")
    out = []
    for T in (1, 512):              # the smallest and the largest tiles of each kind
        cfg = {k: pf_ops.block_config(k, T, 4096, 4096, False, es) for k in ("fused", "shrink", "expand", "linear")}
        out += [
            (tk._fused_lora, dict(y_ptr=p, x_ptr=p, a_ptr=p, b_ptr=p, g_ptr=f32, ro_ptr=i32, scal_ptr=f32),
             dict(BT=cfg["fused"]["BT"], BN=cfg["fused"]["BN"], BR=br, BK=cfg["fused"]["BK"]), cfg["fused"]),
            (tk._shrink, dict(x_ptr=p, a_ptr=p, h_ptr=f32, tok_ptr=i32, pair_w_ptr=f32, count_ptr=i32,
                              start_ptr=i32, active_ptr=i32, ro_ptr=i32),
             dict(BT=cfg["shrink"]["BT"], BR=br, BK=cfg["shrink"]["BK"]), cfg["shrink"]),
            (tk._expand, dict(y_ptr=p, h_ptr=f32, b_ptr=p, g_ptr=f32, ro_ptr=i32),
             dict(BT=cfg["expand"]["BT"], BN=cfg["expand"]["BN"], BR=br), cfg["expand"]),
            (tk._linear_shrink, dict(y_ptr=p, h_ptr=f32, x_ptr=p, w_ptr=p, bias_ptr=p, g_ptr=f32, scal_ptr=f32,
                                     eor_ptr=i32),
             dict(HAS_BIAS=True, BM=cfg["linear"]["BM"], BN=cfg["linear"]["BN"], BK=cfg["linear"]["BK"]),
             cfg["linear"]),
        ]
    seen, unique = set(), []
    for fn, ptrs, consts, cfg in out:
        key = (fn.__name__, tuple(sorted(consts.items())), cfg["num_warps"], cfg["num_stages"])
        if key not in seen:
            seen.add(key)
            unique.append((fn, ptrs, dict(consts, **flags), cfg))
    return unique


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_block_configs_fit_shared_memory(compiled, dtype):
    """The GPU tile configurations (smallest and largest of each kind), at the widest rank tile,
    compiled for sm_86 (Ampere's pipelining, as sm_80): the shared memory each takes fits
    SMEM_LIMIT (99 KiB, sm_86's per-block maximum)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no GPUTarget: {e}")
    for fn, ptrs, consts, cfg in _smem_builds(dtype, pf_ops.BR_MAX):
        k = _compile_for_gpu(fn, ptrs, consts, 86, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        assert k.metadata.shared <= pf_ops.SMEM_LIMIT, (fn.__name__, consts, cfg, k.metadata.shared)


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90(compiled, dtype):
    """Each kernel lowers to PTX for sm_90, the flags a GPU launch uses (no GPU needed)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"this triton has no ASTSource/GPUTarget: {e}")
    from pf_kernels import _triton_kernels as tk
    p, i32, f32 = f"*{dtype}", "*i32", "*fp32"
    flags = dict(INTERP_BF16=False, PREC="ieee" if dtype == "fp32" else "tf32")
    builds = [
        (tk._shrink, dict(x_ptr=p, a_ptr=p, h_ptr=f32, tok_ptr=i32, pair_w_ptr=f32, count_ptr=i32, start_ptr=i32,
                          active_ptr=i32, ro_ptr=i32), dict(BT=64, BR=16, BK=64)),
        (tk._expand, dict(y_ptr=p, h_ptr=f32, b_ptr=p, g_ptr=f32, ro_ptr=i32), dict(BT=16, BN=128, BR=32)),
        (tk._fused_lora, dict(y_ptr=p, x_ptr=p, a_ptr=p, b_ptr=p, g_ptr=f32, ro_ptr=i32, scal_ptr=f32),
         dict(BT=16, BN=64, BR=16, BK=128)),
        (tk._linear_shrink, dict(y_ptr=p, h_ptr=f32, x_ptr=p, w_ptr=p, bias_ptr=p, g_ptr=f32, scal_ptr=f32,
                                 eor_ptr=i32),
         dict(HAS_BIAS=True, BM=64, BN=128, BK=64)),
    ]
    for fn, pointers, blocks in builds:
        kernel = _compile_for_gpu(fn, pointers, dict(blocks, **flags), 90)
        assert ".target sm_90" in kernel.asm["ptx"], fn.__name__


# --------------------------------------------------------------------------------------------
# launcher errors


def _good(T=3, dtype=torch.float32):
    p = make_problem(T, 32, 24, "8", 2, "top2", dtype)
    p["y"] = torch.zeros(T, 24, dtype=dtype)
    return p


def _call_grouped(T=3, **over):
    p = _good(T)
    p.update(over)
    return grouped_lora(p["y"], p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"],
                        meta=p.get("meta"))


def _call_fused(T=3, **over):
    p = _good(T)
    p["w_aug"] = torch.cat([p["w"], p["a_cat"]])
    p["d_out"] = 24
    p.update(over)
    return fused_linear(p["x"], p["w_aug"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"], p["d_out"],
                        bias=p.get("bias_"), out=p.get("out"))


GROUPED_ERRORS = [
    (dict(x=torch.zeros(32)), r"x must be 2-D \[T, d_in\], got shape \(32,\)"),
    (dict(y=torch.zeros(5, 24)), r"y has 5 rows but x has T=3"),
    (dict(a_cat=torch.zeros(16, 31)), r"a_cat has d_in=31 columns but x has d_in=32"),
    (dict(b_cat=torch.zeros(24, 15)), r"b_cat has shape \(24, 15\) but \(d_out, R\) = \(24, 16\)"),
    (dict(a_cat=torch.zeros(16, 32, dtype=torch.float16)), r"a_cat has dtype torch.float16 but x has torch.float32"),
    (dict(x=torch.zeros(3, 32, dtype=torch.int32)), r"x has dtype torch.int32; expected float16, bfloat16 or float32"),
    (dict(gates=torch.zeros(3, 2, dtype=torch.float16)), r"gates must be float32, got torch.float16"),
    (dict(gates=torch.zeros(3, 3)), r"gates has shape \(3, 3\) but \(T, K\) = \(3, 2\)"),
    (dict(rank_offsets=[0, 8, 12]), r"rank_offsets ends at 12 but the bank has R=16 rank rows"),
    (dict(rank_offsets=[0, 12, 8], ), r"rank_offsets must start at 0 and never decrease, got \[0, 12, 8\]"),
    (dict(scalings=torch.ones(3)), r"scalings has 3 entries but rank_offsets implies K=2 experts"),
    (dict(scalings=torch.ones(2, dtype=torch.float64)), r"scalings must be float32, got torch.float64"),
    (dict(meta=LoRAMeta.build(torch.zeros(4, 2), [0, 8, 16], torch.ones(2))),
     r"meta was built for \(T, K, R\) = \(4, 2, 16\) but the call has \(3, 2, 16\)"),
]


@pytest.mark.parametrize("over,match", GROUPED_ERRORS, ids=[m[:24] for _, m in GROUPED_ERRORS])
def test_grouped_lora_errors(interp, over, match):
    with pytest.raises(ValueError, match=match):
        _call_grouped(**over)


FUSED_ERRORS = [
    (dict(w_aug=torch.zeros(40, 31)), r"w_aug has d_in=31 columns but x has d_in=32"),
    (dict(d_out=50), r"w_aug has 40 rows, fewer than d_out=50"),
    (dict(b_cat=torch.zeros(24, 8)), r"b_cat has shape \(24, 8\) but \(d_out, R\) = \(24, 16\)"),
    (dict(bias_=torch.zeros(23)), r"bias has 23 entries but d_out=24"),
    (dict(bias_=torch.zeros(24, dtype=torch.bfloat16)), r"bias has dtype torch.bfloat16 but x has torch.float32"),
    (dict(out=torch.zeros(3, 25)), r"out has shape \(3, 25\) but \(T, d_out\) = \(3, 24\)"),
    (dict(gates=torch.zeros(2, 2)), r"gates has shape \(2, 2\) but \(T, K\) = \(3, 2\)"),
]


@pytest.mark.parametrize("over,match", FUSED_ERRORS, ids=[m[:24] for _, m in FUSED_ERRORS])
def test_fused_linear_errors(interp, over, match):
    with pytest.raises(ValueError, match=match):
        _call_fused(**over)


def test_cpu_tensors_without_interpreter_fail_clearly(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"x is on cpu: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1"):
        _call_grouped()


def test_available_reports_mode(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = pf_kernels.available()
    assert ok == HAVE_TRITON and why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = pf_kernels.available()
    assert ok == (HAVE_TRITON and torch.cuda.is_available()) and why


# --------------------------------------------------------------------------------------------
# CUDA extension loader


@pytest.mark.skipif(cuda_ops.cuda_available()[0], reason="the CUDA kernel is usable here: no fallback to test")
def test_cuda_loader_falls_back_cleanly():
    ok, reason = cuda_ops.cuda_available()
    assert ok is False
    assert any(s in reason for s in ("extension not built", "no GPU", "CUDA runtime unusable")), reason
    p = _good()
    with pytest.raises(RuntimeError, match=r"the CUDA grouped-LoRA kernel is unavailable: "):
        cuda_ops.grouped_lora_cuda(p["y"], p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"],
                                   p["scalings"])


# --------------------------------------------------------------------------------------------
# GPU only


GPU_CASES = [(1, 4096, 4096, "16", 10, "top2", "fp16"), (7, 2048, 5632, "mixed", 10, "skewed", "bf16"),
             (16, 576, 1536, "8", 10, "dense", "fp32"), (133, 1024, 1111, "mixed", 10, "zero_rows", "bf16"),
             (2049, 576, 576, "16", 4, "top2", "fp16")]


@needs_gpu
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=case_id)
def test_triton_gpu_matches_reference(compiled, seed, case):
    p = make_problem(*case, device="cuda")
    check_grouped(p, seed)
    check_fused(p, seed)


@needs_gpu
@pytest.mark.skipif(not cuda_ops.cuda_available()[0], reason=f"CUDA kernel unavailable: {cuda_ops.cuda_available()[1]}")
@pytest.mark.parametrize("case", GPU_CASES[:4] + [(3, 100, 77, "mixed", 5, "top2", "fp16")], ids=case_id)
def test_cuda_kernel_matches_reference(seed, case):
    p = make_problem(*case, device="cuda")
    y0 = torch.randn(case[0], case[2], device="cuda").to(p["x"].dtype)
    y = y0.clone()
    cuda_ops.grouped_lora_cuda(y, p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"])
    ref = y0.double() + grouped_lora_ref(p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"],
                                         p["scalings"])
    assert_close(y, ref, p["x"].dtype, seed, "grouped_lora_cuda")


def _graph_bit_identical(step, y0, y):
    """Eager result of ``step`` (y = y0 + delta) equals the CUDA graph's, replayed twice."""
    y.copy_(y0)
    step()
    eager = y.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                  # warm-up on a side stream, as torch advises
        y.copy_(y0)
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.copy_(y0)
        step()
    for _ in range(2):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)


@needs_gpu
@needs_triton
@pytest.mark.parametrize("T", [4, 64])
def test_triton_cuda_graph_replay_bit_identical(compiled, T):
    p = make_problem(T, 512, 768, "mixed", 10, "top2", "bf16", device="cuda")
    meta = LoRAMeta.build(p["gates"], p["rank_offsets"], p["scalings"])
    y0 = torch.randn(T, 768, device="cuda").to(torch.bfloat16)
    y = torch.empty_like(y0)

    def step():
        meta.refill_(p["gates"])
        grouped_lora(y, p["x"], p["a_cat"], p["b_cat"], p["gates"], p["rank_offsets"], p["scalings"], meta=meta)
    _graph_bit_identical(step, y0, y)


@needs_gpu
@pytest.mark.skipif(not cuda_ops.cuda_available()[0], reason=f"CUDA kernel unavailable: {cuda_ops.cuda_available()[1]}")
def test_cuda_kernel_graph_replay_bit_identical():
    p = make_problem(8, 1024, 1024, "16", 10, "top2", "fp16", device="cuda")
    offsets = p["rank_offsets"].tolist()             # host list: nothing syncs inside the capture
    y0 = torch.randn(8, 1024, device="cuda").to(torch.float16)
    y = torch.empty_like(y0)
    _graph_bit_identical(lambda: cuda_ops.grouped_lora_cuda(y, p["x"], p["a_cat"], p["b_cat"], p["gates"],
                                                            offsets, p["scalings"]), y0, y)


# --------------------------------------------------------------------------------------------
# The launchers' device guard


def test_device_guard_is_the_tensors_cuda_device_and_nothing_off_cuda(monkeypatch):
    """Triton launches on the current CUDA device: the guard makes it x's (issue 33)."""
    import contextlib
    import types
    assert isinstance(pf_ops.on_device(torch.zeros(1)), contextlib.nullcontext)
    seen = []
    monkeypatch.setattr(torch.cuda, "device", lambda d: seen.append(d) or contextlib.nullcontext())
    pf_ops.on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert seen == [torch.device("cuda", 1)]


@pytest.mark.parametrize("call", ["grouped_lora", "fused_linear"])
def test_every_launch_runs_under_the_device_guard(interp, call, monkeypatch):
    """The launches happen inside on_device(x): a kernel launched outside it fails the test."""
    import contextlib
    from pf_kernels import _triton_kernels as tk
    inside = []

    @contextlib.contextmanager
    def guard(x):
        inside.append(True)
        yield
        inside.pop()
    monkeypatch.setattr(pf_ops, "on_device", guard)
    launched = []
    for name in ("fused_lora_kernel", "shrink_kernel", "expand_kernel", "linear_shrink_kernel"):
        kernel = getattr(tk, name)
        monkeypatch.setattr(tk, name, _Spy(kernel, lambda name=name: launched.append((name, bool(inside)))))
    for T in (3, 40):                                   # the decode and the prefill launches
        (_call_grouped if call == "grouped_lora" else _call_fused)(T=T)
    assert launched and all(ok for _, ok in launched), launched


class _Spy:
    """A Triton kernel whose launches (kernel[grid](...)) are recorded first."""

    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        self.record()
        return self.kernel[grid]
