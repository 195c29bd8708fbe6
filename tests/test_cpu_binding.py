"""csrc/cpu's typed API (pf_kernels.cpu_ops: LinearPlan, decode_attention, BlockPlan, the pool)
against float64 references computed here from the same random arrays: odd sizes that are not
multiples of the AVX2 width, mixed ranks, K = 1..16 experts, T = 1..MAX_ROWS rows, every gate
pattern, prologue and residual form, 1-3 threads (more than this machine's cores), strided rows;
one test per class of bad input (the exception, the argument it names, nothing written); two
Python threads at once.  Skips when the module cannot load (cpu_ops.cpu_available)."""
import threading

import numpy as np
import pytest

from pf_kernels import cpu_ops

OK, WHY = cpu_ops.cpu_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"csrc/cpu unavailable: {WHY}")

if OK:
    from pf_kernels.cpu_ops import (MAX_LINEAR_ROWS, MAX_ROWS, PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL, BlockPlan,
                                    LinearPlan, decode_attention)
else:
    MAX_ROWS, MAX_LINEAR_ROWS, PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 16, 4096, 0, 1, 2

F32 = np.float32
TOL = 1e-5
POISON = 7.25


@pytest.fixture(autouse=True)
def small_chunks():
    """Chunks of about one weight row, so that the small sizes here split
    into many chunks and threads > 1 really runs on the pool (the defaults would make every
    region here one chunk, run inline), and the shared-machine detection off (on a busy machine
    it would run every job inline)."""
    mod = cpu_ops._load()[0]
    old = mod._chunking()
    mod._set_chunking(150)
    mod._set_contention_detection(False)   # this machine may be shared: still use the pool
    yield
    mod._set_contention_detection(True)
    mod._set_chunking(old["bytes"])


def close(got, want, tol=TOL):
    err = np.abs(got.astype(np.float64) - want).max()
    assert err <= tol * (1 + np.abs(want).max()), err


# ---------------------------------------------------------------------------------------------
# Random plans and the float64 reference
# ---------------------------------------------------------------------------------------------

class Group:
    """A random projection group: ``sizes`` output parts of d_in inputs, each adapted (or not)
    by a random subset of K experts with ranks 1..16; a few rows of A_cat belong to no part."""

    def __init__(self, rng, d_in, sizes, K, bias=True, skip=(), spare_rows=3):
        self.d_in, self.d_out, self.K = d_in, sum(sizes), K
        self.parts, self.blocks, r, out0 = [], [], 0, 0
        for i, dp in enumerate(sizes):
            if i not in skip:
                r += spare_rows if i else 0            # unused rows between parts
                r0 = r
                n = int(rng.integers(1, K + 1))
                for e in sorted(rng.choice(K, size=n, replace=False).tolist()):
                    rank = int(rng.integers(1, 17))
                    self.blocks.append((len(self.parts), e, r, r + rank, float(rng.uniform(0.2, 2))))
                    r += rank
                bT = (rng.standard_normal((r - r0, dp)) * 0.3).astype(F32)
                self.parts.append((out0, out0 + dp, r0, r, bT))
            out0 += dp
        self.R = r
        self.w_aug = (rng.standard_normal((self.d_out + r, d_in)) / np.sqrt(d_in)).astype(F32)
        self.bias = rng.standard_normal(self.d_out).astype(F32) if bias else None

    def plan(self):
        return LinearPlan(self.w_aug, self.d_out, self.bias, self.parts, self.blocks, self.K)

    def ref(self, x, gates=None, prologue=PRO_NONE, norm=None, eps=0.0, residual=None):
        x = prologue_ref(x, prologue, norm, eps, self.d_in)
        W, A = self.w_aug[:self.d_out].astype(np.float64), self.w_aug[self.d_out:].astype(np.float64)
        y = x @ W.T
        if self.bias is not None:
            y += self.bias
        if gates is not None:
            for p, e, r0, r1, s in self.blocks:
                out0, out1, pr0, _, bT = self.parts[p]
                h = (x @ A[r0:r1].T) * gates[:, e:e + 1].astype(np.float64) * s
                y[:, out0:out1] += h @ bT[r0 - pr0:r1 - pr0].astype(np.float64)
        return y if residual is None else y + residual


def prologue_ref(x, prologue, norm, eps, d_in):
    x = x.astype(np.float64)
    if prologue == PRO_RMSNORM:
        return norm * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    if prologue == PRO_SILU_MUL:
        g, u = x[:, :d_in], x[:, d_in:]
        return g / (1 + np.exp(-g)) * u
    return x


def make_gates(kind, rng, T, K):
    if kind is None:
        return None
    g = rng.uniform(0.1, 1.0, (T, K)).astype(F32)
    if kind == "top2":
        keep = np.zeros((T, K), bool)
        for t in range(T):
            keep[t, rng.choice(K, size=min(2, K), replace=False)] = True
        g[~keep] = 0
    elif kind == "zero":
        g[:] = 0
    elif kind == "zero-rows":
        g[::2] = 0
    return g


def strided(rng, T, width, how):
    """x [T, width] float32 with unit last stride: contiguous, a column slice of wider rows, or
    every other row of a taller array."""
    if how == "rows":
        return rng.standard_normal((2 * T, width)).astype(F32)[::2]
    if how == "cols":
        return rng.standard_normal((T, width + 5)).astype(F32)[:, 3:3 + width]
    return rng.standard_normal((T, width)).astype(F32)


SHAPES = {"d44-13": (44, (13,), ()), "d75-133": (75, (60, 40, 33), (1,)),
          "d44-2x21": (44, (21, 21), ())}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("K", [1, 3, 10, 16])
@pytest.mark.parametrize("T", [1, 2, 5, 16])
def test_linear_plan_matches_fp64(shape, K, T):
    rng = np.random.default_rng([K, T, len(shape), SHAPES[shape][0]])
    d_in, sizes, skip = SHAPES[shape]
    grp = Group(rng, d_in, sizes, K, skip=skip)
    plan = grp.plan()
    assert (plan.d_in, plan.d_out, plan.rank, plan.num_experts) == (d_in, grp.d_out, grp.R, K)
    norm = rng.uniform(0.5, 1.5, d_in).astype(F32)
    eps = 1e-5
    case = 0
    for kind in ("dense", "top2", "zero", "zero-rows", None):
        gates = make_gates(kind, rng, T, K)
        for pro in (PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL):
            width = 2 * d_in if pro == PRO_SILU_MUL else d_in
            for res in (None, "separate", "alias"):
                case += 1
                threads = 1 + case % 3
                x = strided(rng, T, width, ("rows", "cols", "contiguous")[case % 3])
                residual = rng.standard_normal((T, grp.d_out)).astype(F32) if res else None
                want = grp.ref(x, gates, pro, norm, eps, residual)
                if res == "alias":
                    y = residual.copy()
                    plan.run(x, y, gates, threads, pro, norm, eps, residual=y)
                else:
                    y = np.full((T, grp.d_out), np.nan, F32)          # every element written
                    plan.run(x, y, gates, threads=threads, prologue=pro, norm=norm, eps=eps,
                             residual=residual)
                close(y, want)


def test_linear_plan_plain_and_strided_output():
    """R = 0 (the LM head's form), no bias, y a column slice of a wider array: the columns
    beside it stay untouched; every thread count gives the same bits."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 75)).astype(F32)
    plan = LinearPlan(w, 37)
    assert plan.rank == 0 and plan.num_experts == 0
    x = rng.standard_normal((5, 75)).astype(F32)
    outs = []
    for threads in (1, 2, 3, 8):
        buf = np.full((5, 50), POISON, F32)
        plan.run(x, buf[:, 4:41], threads=threads)
        assert (buf[:, :4] == POISON).all() and (buf[:, 41:] == POISON).all()
        close(buf[:, 4:41], x.astype(np.float64) @ w.T.astype(np.float64))
        outs.append(buf.copy())
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_linear_plan_default_chunking_on_the_pool():
    """SmolLM2's gate|up shapes at the module's own chunk sizes: several chunks per region."""
    mod = cpu_ops._load()[0]
    mod._set_chunking(65536)
    rng = np.random.default_rng(11)
    grp = Group(rng, 576, (1536, 1536), 10)
    plan = grp.plan()
    for T, kind in ((1, "top2"), (4, "dense")):
        x = rng.standard_normal((T, 576)).astype(F32)
        gates = make_gates(kind, rng, T, 10)
        for threads in (2, 3):
            y = np.full((T, grp.d_out), np.nan, F32)
            plan.run(x, y, gates, threads)
            close(y, grp.ref(x, gates))


def test_linear_plan_keeps_its_arrays():
    """The plan holds references: the caller's names can go."""
    rng = np.random.default_rng(2)
    grp = Group(rng, 44, (13,), 3)
    plan = grp.plan()
    x = rng.standard_normal((2, 44)).astype(F32)
    gates = make_gates("dense", rng, 2, 3)
    want = grp.ref(x, gates)
    del grp
    y = np.empty((2, 13), F32)
    plan.run(x, y, gates)
    close(y, want)


# ---------------------------------------------------------------------------------------------
# decode_attention
# ---------------------------------------------------------------------------------------------

def rope_ref(x, c, s):
    return x * c + np.roll(x, x.shape[-1] // 2, -1) * s


def attention_ref(qkv, cos, sin, k_cache, v_cache, layer, row0, cols, bias, slots=None):
    """float64: the caches after the write, and out [B, H*D]; row b in slot slots[b] (default
    row0 + b), every row's k, v written before any row attends."""
    B, L = bias.shape
    H_kv, D = k_cache.shape[2], cos.shape[2]
    H = cos.shape[1] - H_kv
    qkv, cos, sin = (a.astype(np.float64) for a in (qkv, cos, sin))
    q = rope_ref(qkv[:, :H * D].reshape(B, H, D), cos[:, :H], sin[:, :H])
    k = rope_ref(qkv[:, H * D:(H + H_kv) * D].reshape(B, H_kv, D), cos[:, H:], sin[:, H:])
    v = qkv[:, (H + H_kv) * D:].reshape(B, H_kv, D)
    kc, vc = k_cache.astype(np.float64), v_cache.astype(np.float64)
    slots = np.arange(row0, row0 + B) if slots is None else np.asarray(slots)
    for b in range(B):
        kc[layer, slots[b], :, cols[b]] = k[b]
        vc[layer, slots[b], :, cols[b]] = v[b]
    K = np.repeat(kc[layer, slots, :, :L], H // H_kv, axis=1)               # [B, H, L, D]
    V = np.repeat(vc[layer, slots, :, :L], H // H_kv, axis=1)
    s = np.einsum("bhd,bhld->bhl", q, K) + bias[:, None, :].astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return kc, vc, np.einsum("bhl,bhld->bhd", p, V).reshape(B, H * D)


def step_inputs(a):
    """attention_inputs without qkv: BlockPlan.step's keyword arguments."""
    return {n: v for n, v in a.items() if n != "qkv"}


def attention_inputs(rng, B, H, H_kv, D, L, layers=3, slots=None, max_len=None, row0=1):
    slots = slots or B + 2
    max_len = max_len or L + 3
    qkv = rng.standard_normal((B, (H + 2 * H_kv) * D)).astype(F32)
    cos = rng.uniform(-1, 1, (B, H + H_kv, D)).astype(F32)
    sin = rng.uniform(-1, 1, (B, H + H_kv, D)).astype(F32)
    k = rng.standard_normal((layers, slots, H_kv, max_len, D)).astype(F32)
    v = rng.standard_normal((layers, slots, H_kv, max_len, D)).astype(F32)
    cols = rng.integers(0, L, B).astype(np.int64)
    bias = np.where(rng.random((B, L)) < 0.3, -np.inf, 0.0).astype(F32)
    bias[np.arange(B), cols] = 0.0                       # each row sees at least its own column
    return dict(qkv=qkv, cos=cos, sin=sin, k_cache=k, v_cache=v, layer=layers - 1, row0=row0,
                cols=cols, bias=bias)


@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("H, H_kv, D", [(4, 2, 6), (6, 2, 10), (3, 3, 64), (8, 1, 16)])
def test_decode_attention_matches_fp64(B, H, H_kv, D):
    rng = np.random.default_rng([B, H, H_kv, D])
    for threads, L in ((1, 1), (2, 9), (3, 33)):
        a = attention_inputs(rng, B, H, H_kv, D, L)
        kc, vc, want = attention_ref(**a)
        out = np.full((B, H * D), np.nan, F32)
        decode_attention(**a, out=out, threads=threads)
        close(out, want)
        close(a["k_cache"], kc)                         # the write, and nothing else changed
        close(a["v_cache"], vc)


@pytest.mark.parametrize("B", [1, 5, 16])
def test_rows_of_one_slot_a_prefill_chunk(B):
    """slots=: B tokens of one slot at columns c0.., each seeing the columns up to its own (a
    prefill chunk), against fp64; and split into two calls the outputs are bit-identical (a
    token's sum does not depend on its call or on L)."""
    rng = np.random.default_rng([7, B])
    H, H_kv, D, c0, L = 4, 2, 8, 3, 3 + B + 4
    a = attention_inputs(rng, B, H, H_kv, D, L, slots=3)
    a["cols"] = np.arange(c0, c0 + B, dtype=np.int64)
    a["bias"] = np.where(np.arange(L)[None, :] <= a["cols"][:, None], 0.0, -np.inf).astype(F32)
    slots = np.full(B, 2, np.int64)
    start = {n: a[n].copy() for n in ("k_cache", "v_cache")}
    kc, vc, want = attention_ref(**a, slots=slots)
    out = np.full((B, H * D), np.nan, F32)
    decode_attention(**a, out=out, threads=2, slots=slots)
    close(out, want)
    close(a["k_cache"], kc)
    close(a["v_cache"], vc)
    if B > 1:
        a.update({n: start[n].copy() for n in start})
        split = np.full((B, H * D), np.nan, F32)
        for j in (slice(0, B // 2), slice(B // 2, B)):
            part = {**a, "qkv": a["qkv"][j], "cos": a["cos"][j].copy(), "sin": a["sin"][j].copy(),
                    "cols": a["cols"][j].copy(), "bias": a["bias"][j, :c0 + j.stop].copy()}
            decode_attention(**part, out=split[j], threads=1, slots=slots[j].copy())
        np.testing.assert_array_equal(split, out)


# ---------------------------------------------------------------------------------------------
# BlockPlan
# ---------------------------------------------------------------------------------------------

class BlockParts:
    """A random decoder block: d, H, H_kv, D, f and K experts on every projection."""

    def __init__(self, rng, d=44, H=4, H_kv=2, D=6, f=75, K=3, bias=True):
        self.d, self.H, self.H_kv, self.D, self.K = d, H, H_kv, D, K
        self.groups = {"qkv": Group(rng, d, (H * D, H_kv * D, H_kv * D), K, bias),
                       "o": Group(rng, H * D, (d,), K, bias),
                       "gate_up": Group(rng, d, (f, f), K, bias),
                       "down": Group(rng, f, (d,), K, bias)}
        self.plans = {n: g.plan() for n, g in self.groups.items()}
        self.attn_norm = rng.uniform(0.5, 1.5, d).astype(F32)
        self.mlp_norm = rng.uniform(0.5, 1.5, d).astype(F32)
        self.eps = 1e-6

    def plan(self):
        p = self.plans
        return BlockPlan(p["qkv"], p["o"], p["gate_up"], p["down"], self.attn_norm, self.mlp_norm,
                         self.eps, self.H, self.H_kv, self.D)

    def composed(self, h, gates, a, threads):
        """The same step from LinearPlan.run + decode_attention + numpy: h updated in place."""
        p, B = self.plans, h.shape[0]
        qkv = np.empty((B, p["qkv"].d_out), F32)
        p["qkv"].run(h, qkv, gates, threads, PRO_RMSNORM, self.attn_norm, self.eps)
        att = np.empty((B, self.H * self.D), F32)
        decode_attention(qkv, a["cos"], a["sin"], a["k_cache"], a["v_cache"], a["layer"],
                         a["row0"], a["cols"], a["bias"], att, threads)
        p["o"].run(att, h, gates, threads, residual=h)
        gu = np.empty((B, p["gate_up"].d_out), F32)
        p["gate_up"].run(h, gu, gates, threads, PRO_RMSNORM, self.mlp_norm, self.eps)
        p["down"].run(gu, h, gates, threads, PRO_SILU_MUL, residual=h)


@pytest.mark.parametrize("B", [1, 4, 16])
@pytest.mark.parametrize("kind", ["dense", "top2", "zero-rows", None])
def test_block_plan_matches_composed(B, kind):
    rng = np.random.default_rng([B, len(str(kind))])
    blk = BlockParts(rng, H=6, H_kv=3, D=10) if B == 4 else BlockParts(rng)
    plan = blk.plan()
    assert plan.d == blk.d and plan.num_experts == blk.K
    for threads in (1, 2, 3):
        a = attention_inputs(rng, B, blk.H, blk.H_kv, blk.D, L=7)
        gates = make_gates(kind, rng, B, blk.K)
        h0 = rng.standard_normal((B, blk.d)).astype(F32)
        h_ref, a_ref = h0.copy(), {n: v.copy() if isinstance(v, np.ndarray) else v for n, v in a.items()}
        blk.composed(h_ref, gates, a_ref, threads)
        h = h0.copy()
        plan.step(h, gates, threads=threads, **step_inputs(a))
        close(h, h_ref, 1e-6)
        close(a["k_cache"], a_ref["k_cache"], 1e-6)
        close(a["v_cache"], a_ref["v_cache"], 1e-6)


def test_block_plan_composed_matches_fp64():
    """The composition the step is held to is itself the block's maths (fp64, one row set)."""
    rng = np.random.default_rng(5)
    blk = BlockParts(rng)
    B = 3
    a = attention_inputs(rng, B, blk.H, blk.H_kv, blk.D, L=6)
    gates = make_gates("dense", rng, B, blk.K)
    h = rng.standard_normal((B, blk.d)).astype(F32)
    g = blk.groups
    qkv = g["qkv"].ref(h, gates, PRO_RMSNORM, blk.attn_norm, blk.eps)
    kc, vc, att = attention_ref(**{**a, "qkv": qkv})
    h1 = g["o"].ref(att, gates, residual=h.astype(np.float64))
    gu = g["gate_up"].ref(h1, gates, PRO_RMSNORM, blk.mlp_norm, blk.eps)
    want = g["down"].ref(gu, gates, PRO_SILU_MUL, residual=h1)
    blk.plan().step(h, gates, **step_inputs(a))
    close(h, want, 1e-4)
    close(a["k_cache"], kc, 1e-4)


# ---------------------------------------------------------------------------------------------
# Checks: one test per class of bad input; the message names the argument; nothing written
# ---------------------------------------------------------------------------------------------

def raises(exc, words, fn, *args, **kw):
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.fixture
def lin():
    """A group, its plan, good run() arguments and a poisoned y."""
    rng = np.random.default_rng(3)
    grp = Group(rng, 44, (16,), 3)
    T = 2
    args = dict(x=rng.standard_normal((T, 44)).astype(F32), y=np.full((T, 16), POISON, F32),
                gates=make_gates("dense", rng, T, 3), norm=np.ones(44, F32))
    return grp, grp.plan(), args


def read_only(a):
    a.flags.writeable = False
    return a


def run_fails(plan, args, exc, words, **override):
    kw = {**args, **override}
    y = kw["y"]
    before = y.copy() if isinstance(y, np.ndarray) else None
    msg = raises(exc, words, plan.run, **kw)
    if before is not None:
        np.testing.assert_array_equal(y, before)
    assert msg.startswith("LinearPlan.run: ")
    return msg


def test_run_wrong_dtype(lin):
    _, plan, args = lin
    run_fails(plan, args, TypeError, ["x", "float64", "float32"], x=args["x"].astype(np.float64))
    run_fails(plan, args, TypeError, ["gates", "float16"], gates=args["gates"].astype(np.float16))
    run_fails(plan, args, TypeError, ["y", "int32"], y=np.zeros((2, 16), np.int32))
    run_fails(plan, args, TypeError, ["x", "list"], x=args["x"].tolist())
    torch = pytest.importorskip("torch")
    run_fails(plan, args, TypeError, ["x", "Tensor", "numpy"], x=torch.from_numpy(args["x"]))


def test_run_wrong_shape(lin):
    _, plan, args = lin
    run_fails(plan, args, ValueError, ["x", "(2, 40)", "(2, 44)", "d_in"], x=args["x"][:, :40])
    run_fails(plan, args, ValueError, ["y", "(2, 15)", "d_out"], y=np.full((2, 15), POISON, F32))
    run_fails(plan, args, ValueError, ["y", "(3, 16)"], y=np.full((3, 16), POISON, F32))
    run_fails(plan, args, ValueError, ["gates", "(2, 4)", "num_experts"], gates=np.ones((2, 4), F32))
    run_fails(plan, args, ValueError, ["x", "3 dims"], x=args["x"][None])
    run_fails(plan, args, ValueError, ["x", "2*d_in"], prologue=PRO_SILU_MUL)
    run_fails(plan, args, ValueError, ["norm", "(43,)", "d_in"], prologue=PRO_RMSNORM,
              norm=np.ones(43, F32))
    run_fails(plan, args, ValueError, ["residual", "(2, 12)"], residual=np.zeros((2, 12), F32))


def test_run_non_contiguous(lin):
    _, plan, args = lin
    wide = np.zeros((2, 88), F32)
    run_fails(plan, args, ValueError, ["x", "unit last stride"], x=wide[:, ::2])
    run_fails(plan, args, ValueError, ["y", "unit last stride"], y=np.full((2, 32), POISON, F32)[:, ::2])
    run_fails(plan, args, ValueError, ["gates", "unit last stride"], gates=np.ones((2, 6), F32)[:, ::2])
    run_fails(plan, args, ValueError, ["norm", "C-contiguous"], prologue=PRO_RMSNORM,
              norm=np.ones(88, F32)[::2])
    run_fails(plan, args, ValueError, ["y", "read-only"], y=read_only(np.full((2, 16), POISON, F32)))


@pytest.mark.parametrize("T", [0, MAX_LINEAR_ROWS + 1])
def test_run_row_count(lin, T):
    _, plan, args = lin
    rng = np.random.default_rng(T)
    run_fails(plan, args, ValueError, ["T = x.shape[0]", str(T), str(MAX_LINEAR_ROWS)],
              x=rng.standard_normal((T, 44)).astype(F32), y=np.full((T, 16), POISON, F32),
              gates=None)


def test_run_bad_values(lin):
    _, plan, args = lin
    run_fails(plan, args, ValueError, ["prologue", "3"], prologue=3)
    run_fails(plan, args, ValueError, ["norm", "None", "PRO_RMSNORM"], prologue=PRO_RMSNORM, norm=None)
    run_fails(plan, args, ValueError, ["eps"], eps=-1.0)
    run_fails(plan, args, ValueError, ["threads", "0"], threads=0)


def test_run_aliasing(lin):
    _, plan, args = lin
    buf = np.full((2, 60), POISON, F32)
    run_fails(plan, args, ValueError, ["x", "shares memory", "y"], x=buf[:, :44], y=buf[:, 44:])
    y = args["y"]
    shifted = np.full((3, 16), POISON, F32)
    run_fails(plan, args, ValueError, ["residual", "shares memory", "y"], y=shifted[1:], residual=shifted[:2])
    run_fails(plan, args, ValueError, ["y", "overlapping rows"],
              y=np.lib.stride_tricks.as_strided(y, (2, 16), (8, 4)))


def plan_fails(grp, exc, words, **override):
    kw = dict(weight=grp.w_aug, d_out=grp.d_out, bias=grp.bias, parts=grp.parts, blocks=grp.blocks,
              num_experts=grp.K)
    kw.update(override)
    msg = raises(exc, words, LinearPlan, **kw)
    assert msg.startswith("LinearPlan: ")


@pytest.fixture
def grp2():
    """Two adapted parts (the plan checks' subject)."""
    return Group(np.random.default_rng(4), 44, (10, 12), 4, spare_rows=0)


def test_plan_wrong_dtype_and_layout(grp2):
    g = grp2
    plan_fails(g, TypeError, ["weight", "float64"], weight=g.w_aug.astype(np.float64))
    plan_fails(g, TypeError, ["bias", "int64"], bias=np.zeros(g.d_out, np.int64))
    plan_fails(g, ValueError, ["weight", "C-contiguous"], weight=np.asfortranarray(g.w_aug))
    p0 = g.parts[0]
    plan_fails(g, ValueError, ["parts[0].bT", "C-contiguous"],
               parts=[p0[:4] + (np.asfortranarray(p0[4]),)] + g.parts[1:])
    plan_fails(g, TypeError, ["parts[0].bT", "float64"], parts=[p0[:4] + (p0[4].astype(float),)] + g.parts[1:])


def test_plan_wrong_shape(grp2):
    g = grp2
    plan_fails(g, ValueError, ["bias", f"({g.d_out - 1},)", f"({g.d_out},)", "d_out"], bias=g.bias[:-1])
    plan_fails(g, ValueError, ["d_out", "0"], d_out=0)
    plan_fails(g, ValueError, ["d_out", str(g.w_aug.shape[0] + 1)], d_out=g.w_aug.shape[0] + 1)
    p0 = g.parts[0]
    plan_fails(g, ValueError, ["parts[0].bT", "r1 - r0, out1 - out0"],
               parts=[p0[:4] + (p0[4][:, :-1].copy(),)] + g.parts[1:])
    plan_fails(g, ValueError, ["parts[0]", "4 items"], parts=[p0[:4]] + g.parts[1:])


def test_plan_overlapping_parts(grp2):
    g = grp2
    (a0, a1, ar0, ar1, abT), (b0, b1, br0, br1, bbT) = g.parts
    plan_fails(g, ValueError, ["parts[1]", "overlaps", "parts[0]"],
               parts=[g.parts[0], (a1 - 1, a1 - 1 + (b1 - b0), br0, br1, bbT)])
    plan_fails(g, ValueError, ["parts[1]", "overlaps"],
               parts=[g.parts[0], (b0, b1, ar1 - 1, ar1 - 1 + (br1 - br0), bbT)])
    plan_fails(g, ValueError, ["parts[1]"], parts=[g.parts[1], g.parts[0]])
    plan_fails(g, ValueError, ["parts[0]", "d_out"], parts=[(a0, g.d_out + 1, ar0, ar1, abT)])
    plan_fails(g, ValueError, ["parts[0]", "rows"], parts=[(a0, a1, ar0, g.R + 1, abT)])


def test_plan_expert_out_of_range(grp2):
    g = grp2
    p, e, r0, r1, s = g.blocks[0]
    plan_fails(g, ValueError, ["blocks[0]", f"expert {g.K}", "num_experts"],
               blocks=[(p, g.K, r0, r1, s)] + g.blocks[1:])
    plan_fails(g, ValueError, ["blocks[0]", "expert -1"], blocks=[(p, -1, r0, r1, s)] + g.blocks[1:])


def test_plan_bad_block_range(grp2):
    g = grp2
    p, e, r0, r1, s = g.blocks[0]
    pr1 = g.parts[p][3]
    plan_fails(g, ValueError, ["blocks[0]", "rows"], blocks=[(p, e, r0, pr1 + 1, s)] + g.blocks[1:])
    plan_fails(g, ValueError, ["blocks[0]", "rows"], blocks=[(p, e, r1, r0, s)] + g.blocks[1:])
    plan_fails(g, ValueError, ["blocks[0].part"], blocks=[(5, e, r0, r1, s)] + g.blocks[1:])
    last = g.blocks[-1]
    plan_fails(g, ValueError, ["sorted by part"], blocks=[last] + g.blocks[:-1])
    dup = [b for b in g.blocks if b[0] == 0][:1] * 2 + [b for b in g.blocks if b[0] == 1]
    plan_fails(g, ValueError, ["blocks[1]", "overlapping"], blocks=dup)
    plan_fails(g, TypeError, ["blocks[0].r0"], blocks=[(p, e, 1.5, r1, s)] + g.blocks[1:])


@pytest.fixture
def att():
    rng = np.random.default_rng(6)
    a = attention_inputs(rng, B=2, H=4, H_kv=2, D=6, L=5, layers=2, slots=4)
    a["out"] = np.full((2, 24), POISON, F32)
    return a


def attention_fails(a, exc, words, **override):
    kw = {**a, **override}
    before = [kw[n].copy() for n in ("out", "k_cache", "v_cache")]
    msg = raises(exc, words, decode_attention, **kw)
    for b, n in zip(before, ("out", "k_cache", "v_cache")):
        np.testing.assert_array_equal(kw[n], b)
    assert msg.startswith("decode_attention: ")


def test_attention_bad_slots(att):
    attention_fails(att, ValueError, ["slots[1]", "slots - 1"], slots=np.array([0, 4], np.int64))
    attention_fails(att, ValueError, ["slots", "B"], slots=np.array([0], np.int64))
    attention_fails(att, TypeError, ["slots", "int32"], slots=np.array([0, 1], np.int32))


def test_attention_wrong_dtype(att):
    attention_fails(att, TypeError, ["cols", "int32", "int64"], cols=att["cols"].astype(np.int32))
    attention_fails(att, TypeError, ["k_cache", "float64"], k_cache=att["k_cache"].astype(np.float64))
    attention_fails(att, TypeError, ["qkv", "float64"], qkv=att["qkv"].astype(np.float64))


def test_attention_wrong_shape(att):
    a = att
    attention_fails(a, ValueError, ["qkv", "(2, 47)"], qkv=a["qkv"][:, :47])
    attention_fails(a, ValueError, ["sin", "(2, 6, 4)"], sin=a["sin"][:, :, :4].copy())
    attention_fails(a, ValueError, ["v_cache", "k_cache's shape"], v_cache=a["v_cache"][:, :3].copy())
    attention_fails(a, ValueError, ["bias", "(1, 5)"], bias=a["bias"][:1])
    attention_fails(a, ValueError, ["out", "(2, 20)"], out=np.full((2, 20), POISON, F32))
    attention_fails(a, ValueError, ["H = cos.shape[1] - H_kv", "multiple of H_kv"],
                    cos=np.ones((2, 5, 6), F32), sin=np.ones((2, 5, 6), F32))
    attention_fails(a, ValueError, ["even head size"], cos=np.ones((2, 6, 5), F32))
    attention_fails(a, ValueError, ["L = bias.shape[1]", "max_len"], bias=np.zeros((2, 99), F32))


def test_attention_non_contiguous(att):
    a = att
    attention_fails(a, ValueError, ["k_cache", "C-contiguous"],
                    k_cache=a["k_cache"].transpose(0, 1, 3, 2, 4).copy().transpose(0, 1, 3, 2, 4))
    attention_fails(a, ValueError, ["cos", "C-contiguous"], cos=np.repeat(a["cos"], 2, 2)[:, :, ::2])
    attention_fails(a, ValueError, ["out", "C-contiguous"], out=np.full((2, 48), POISON, F32)[:, ::2])
    attention_fails(a, ValueError, ["k_cache", "read-only"], k_cache=read_only(a["k_cache"].copy()))


@pytest.mark.parametrize("B", [0, MAX_ROWS + 1])
def test_attention_row_count(att, B):
    a = att
    attention_fails(a, ValueError, ["B = qkv.shape[0]", str(B)], qkv=np.zeros((B, 48), F32))


def test_attention_cols_out_of_range(att):
    a = att
    L = a["bias"].shape[1]
    attention_fails(a, ValueError, ["cols[1]", str(L), f"[0, {L - 1}]"], cols=np.array([0, L], np.int64))
    attention_fails(a, ValueError, ["cols[0]", "-1"], cols=np.array([-1, 0], np.int64))
    attention_fails(a, ValueError, ["cols", "(3,)"], cols=np.zeros(3, np.int64))


def test_attention_layer_and_rows_out_of_range(att):
    a = att
    attention_fails(a, ValueError, ["layer", "2", "[0, 1]"], layer=2)
    attention_fails(a, ValueError, ["layer", "-1"], layer=-1)
    attention_fails(a, ValueError, ["row0", "3", "[0, 2]"], row0=3)
    attention_fails(a, ValueError, ["threads"], threads=0)


@pytest.fixture
def blockp():
    rng = np.random.default_rng(7)
    blk = BlockParts(rng)
    a = step_inputs(attention_inputs(rng, 2, blk.H, blk.H_kv, blk.D, L=5))
    return blk, blk.plan(), a, rng.standard_normal((2, blk.d)).astype(F32)


def step_fails(plan, h, a, exc, words, gates=None, **override):
    kw = {**a, **override}
    before = [h.copy(), kw["k_cache"].copy(), kw["v_cache"].copy()]
    msg = raises(exc, words, plan.step, h, gates, **kw)
    for b, now in zip(before, (h, kw["k_cache"], kw["v_cache"])):
        np.testing.assert_array_equal(now, b)
    assert msg.startswith("BlockPlan.step: ")


def test_step_checks(blockp):
    blk, plan, a, h = blockp
    raises(TypeError, ["h", "float64"], plan.step, h.astype(np.float64), None, **a)
    step_fails(plan, h, a, ValueError, ["gates", "(2, 4)", "num_experts"], gates=np.ones((2, 4), F32))
    step_fails(plan, h, a, ValueError, ["cos", "B, H + H_kv, D"], cos=a["cos"][:1].copy())
    step_fails(plan, h, a, ValueError, ["k_cache"], k_cache=np.zeros((3, 4, 1, 8, 6), F32))
    step_fails(plan, h, a, ValueError, ["cols[0]"], cols=np.array([99, 0], np.int64))
    step_fails(plan, h, a, ValueError, ["layer"], layer=7)
    raises(ValueError, ["h", "C-contiguous"], plan.step, np.repeat(h, 2, 1)[:, ::2], None, **a)
    raises(ValueError, ["B = h.shape[0]", "17"], plan.step, np.zeros((17, blk.d), F32), None, **a)
    raises(ValueError, ["h", "(2, 43)"], plan.step, h[:, :43].copy(), None, **a)


def test_block_plan_checks_the_shape_chain():
    rng = np.random.default_rng(8)
    blk = BlockParts(rng)
    p = blk.plans
    good = dict(qkv=p["qkv"], o=p["o"], gate_up=p["gate_up"], down=p["down"], attn_norm=blk.attn_norm,
                mlp_norm=blk.mlp_norm, eps=blk.eps, n_heads=blk.H, n_kv_heads=blk.H_kv, head_dim=blk.D)
    other = BlockParts(rng, d=40, H=4, H_kv=2, D=6, f=75)
    for override, words in (
            (dict(n_heads=5), ["n_heads", "multiple of n_kv_heads"]),
            (dict(head_dim=5), ["head_dim", "even"]),
            (dict(n_kv_heads=1), ["qkv.d_out", "n_heads + 2*n_kv_heads"]),
            (dict(o=other.plans["o"]), ["o.d_out", "40", "44"]),
            (dict(down=other.plans["down"]), ["down.d_out"]),
            (dict(gate_up=p["qkv"]), ["gate_up.d_out", "2*down.d_in"]),
            (dict(mlp_norm=blk.mlp_norm[:-1]), ["mlp_norm", "(43,)"]),
            (dict(o=Group(rng, 24, (44,), 2).plan()), ["o.num_experts", "2", "3"])):
        raises(ValueError, words, BlockPlan, **{**good, **override})
    raises(TypeError, ["o", "ndarray", "LinearPlan"], BlockPlan, **{**good, "o": blk.attn_norm})


# ---------------------------------------------------------------------------------------------
# The pool: two Python threads at once, spin settings
# ---------------------------------------------------------------------------------------------

def test_two_python_threads_at_once():
    """Two threads call run() on different plans (and step on one block) many times at
    threads=2 with the GIL released: every result equals the single-threaded one, bit for bit."""
    rng = np.random.default_rng(9)
    groups = [Group(rng, 75, (60, 40, 33), 10), Group(rng, 44, (21, 21), 16)]
    plans = [g.plan() for g in groups]
    inputs = [(rng.standard_normal((5, g.d_in)).astype(F32), make_gates("top2", rng, 5, g.K)) for g in groups]
    want = []
    for plan, (x, gates) in zip(plans, inputs):
        y = np.empty((5, plan.d_out), F32)
        plan.run(x, y, gates, threads=1)
        want.append(y)
    errors = []

    def worker(i):
        try:
            y = np.empty_like(want[i])
            for _ in range(300):
                y.fill(np.nan)
                plans[i].run(*inputs[i][:1], y, inputs[i][1], threads=2)
                if not np.array_equal(y, want[i]):
                    errors.append((i, np.abs(y - want[i]).max()))
                    return
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))

    ts = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_spin_settings_and_sleeping_workers():
    """spin_us round-trips; with no spinning at all (every wait sleeps at once) and with a long
    spin, results are unchanged; the pool starts threads - 1 workers lazily."""
    rng = np.random.default_rng(10)
    grp = Group(rng, 75, (60, 40, 33), 10)
    plan = grp.plan()
    x, gates = rng.standard_normal((3, 75)).astype(F32), make_gates("dense", rng, 3, 10)
    want = grp.ref(x, gates)
    old = cpu_ops.spin_us()
    try:
        for spin in (0, 5, 2000):
            cpu_ops.set_spin_us(spin)
            assert cpu_ops.spin_us() == spin
            for _ in range(50):
                y = np.full((3, grp.d_out), np.nan, F32)
                plan.run(x, y, gates, threads=3)
                close(y, want)
        assert cpu_ops.pool_workers() >= 2
        raises(ValueError, ["us", "-1"], cpu_ops.set_spin_us, -1)
    finally:
        cpu_ops.set_spin_us(old)
