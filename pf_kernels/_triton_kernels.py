"""The Triton kernels (layer 1 of 3).  Launchers live in ops.py; references in reference.py.

Shapes and notation as in reference.py.  Every kernel accumulates in fp32 and takes explicit
strides.  Rank tiles are BR = min(BR_MAX, max(16, next_pow2(max_k r_k))) wide (ops.rank_tile) and
loaded with a mask (column < r_k), so banks need no padding: the zero-filled columns satisfy
tl.dot's K >= 16.  An expert of rank above BR is walked in chunks of BR, so shared memory stays
bounded whatever the rank.

Constexpr flags common to all kernels:
    INTERP_BF16  set when interpreting bf16 inputs, to work around two interpreter artefacts: its
                 bf16 tl.dot is wrong (the tiles are cast to fp32 first) and its fp32 -> bf16 cast
                 truncates (the stored values are rounded to nearest even first, as on a GPU)
    PREC    tl.dot's input_precision: "ieee" for fp32 inputs (tf32 would miss 1e-5), else "tf32"
            (ignored for fp16/bf16)

The loops the kernels share are device functions (HELPERS): ``_dot_rows`` (the K-loop of every
shrink and of the base GEMM), ``_expand_dot`` (one rank chunk of an expand) and ``_store_out``
(the epilogue's bf16 rounding, cast and store).

Each kernel is wrapped in a :class:`LazyKernel`, which builds the jitted (GPU) or interpreted
(TRITON_INTERPRET=1, CPU) flavour when it is launched, so the mode is read at launch time and not
frozen by whoever imported this module first.  An interpreted kernel cannot call a jitted
function, nor a compiled one an interpreted function, so :func:`jitted` builds each mode's kernels
over their own copy of this module's globals, in which the helpers are jitted for that mode too.
For the same reason the kernels call no @jit function of triton.language (tl.zeros, tl.max,
tl.cdiv, ...): those are jitted or interpreted once, when triton is imported.  Builtins only
(tl.full, tl.reduce), so the interpreter works whatever the import order.
"""
from __future__ import annotations

import os
import types

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:            # triton < 3.3 has no knobs
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


HELPERS = ("_dot_rows", "_expand_dot", "_round_bf16", "_store_out")   # device functions
_NAMESPACES: dict[bool, dict] = {}      # interpreting -> globals whose helpers have that flavour


def _rebind(fn, namespace: dict):
    """``fn`` (same code, signature and annotations) looking its globals up in ``namespace``."""
    out = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__annotations__ = dict(fn.__annotations__)
    out.__kwdefaults__, out.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    out.__module__, out.__doc__ = fn.__module__, fn.__doc__
    return out


def _namespace(interpret: bool) -> dict:
    """This module's globals with every helper jitted (``interpret`` False) or interpreted."""
    ns = _NAMESPACES.get(interpret)
    if ns is None:
        ns = dict(globals())
        for name in HELPERS:                       # triton.jit reads the mode right now
            ns[name] = triton.jit(_rebind(globals()[name], ns))
        _NAMESPACES[interpret] = ns
    return ns


def jitted(fn, interpret: bool | None = None):
    """Kernel ``fn`` jitted for the GPU (``interpret`` False) or the interpreter (True); None:
    the mode current now.  Must be called in that mode, as triton.jit reads it."""
    mode = interpreting() if interpret is None else interpret
    if mode != interpreting():
        raise RuntimeError(f"jitted(interpret={mode}) called while interpreting() is "
                           f"{interpreting()}: triton.jit builds the current mode's flavour")
    return triton.jit(_rebind(fn, _namespace(mode)))


class LazyKernel:
    """``kernel[grid](...)`` that jits ``fn`` for the mode (GPU or interpreter) current at
    launch."""

    def __init__(self, fn):
        self.fn = fn
        self._by_mode = {}

    def __getitem__(self, grid):
        mode = interpreting()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            kernel = self._by_mode[mode] = jitted(self.fn, mode)
        return kernel[grid]


def _max_combine(a, b):
    return tl.maximum(a, b)


# tl.reduce's combine function for a max: triton.language's own, which the interpreter recognises
# and reduces with numpy (a combine function of ours would run per element, ~100x slower).  Like
# every @jit function of triton.language it takes the flavour current when triton was imported,
# so compiled launches need triton imported without TRITON_INTERPRET=1, as any tl.max would.
_MAX = getattr(getattr(tl, "standard", None), "_elementwise_max", None) or JITFunction(_max_combine)


def can_compile() -> bool:
    """False when triton was imported with TRITON_INTERPRET=1 (its @jit library is interpreted)."""
    return isinstance(_MAX, JITFunction)


def _dot_rows(acc, x_ptr, xr, m_x, stride_xt, stride_xd, w_ptr, wr, m_w, stride_wr, stride_wd,
              d_in, BK: tl.constexpr, INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc (BT, BN) + x[xr, :d_in] W[wr, :d_in]^T in fp32, walked in BK-wide column steps.

    xr (BT,) int64 rows of x with mask m_x; wr (BN,) int64 rows of W with mask m_w; masked rows
    and columns past d_in read zeros.  The K-loop of every shrink (W = A_cat) and of the base
    GEMM (W = W_aug).
    """
    offs_k = tl.arange(0, BK)
    for k0 in range(0, d_in, BK):
        kk = k0 + offs_k
        m_k = kk < d_in
        xt = tl.load(x_ptr + xr[:, None] * stride_xt + kk[None, :] * stride_xd,
                     mask=m_x[:, None] & m_k[None, :], other=0.0)                  # (BT, BK)
        wt = tl.load(w_ptr + wr[None, :] * stride_wr + kk[:, None] * stride_wd,
                     mask=m_w[None, :] & m_k[:, None], other=0.0)                  # (BK, BN)
        if INTERP_BF16:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
    return acc


def _expand_dot(acc, h, b_ptr, cols, m_r, n64, m_n, stride_bn, stride_br,
                INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """acc (BT, BN) + h B[n64, cols]^T: one rank chunk of an expand.

    h (BT, BR) fp32, already gated; cols (BR,) int64 columns of B_cat with mask m_r; n64 (BN,)
    output columns with mask m_n.  h is cast to B's dtype for the dot (fp32 accumulation).
    """
    b = tl.load(b_ptr + n64[None, :] * stride_bn + cols[:, None] * stride_br,
                mask=m_r[:, None] & m_n[None, :], other=0.0)                       # (BR, BN)
    if INTERP_BF16:
        b = b.to(tl.float32)
    else:
        h = h.to(b.dtype)
    return tl.dot(h, b, acc, input_precision=PREC)


def _round_bf16(v):
    """fp32 v rounded to the nearest bf16 (ties to even), still fp32: the interpreter's
    fp32 -> bf16 cast truncates, a GPU's rounds."""
    bits = v.to(tl.uint32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)


def _store_out(ptrs, v, mask, INTERP_BF16: tl.constexpr):
    """Store fp32 v at ptrs in their dtype, rounding as a GPU does when interpreting bf16."""
    if INTERP_BF16:
        v = _round_bf16(v)
    tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


def _shrink(x_ptr, a_ptr, h_ptr, tok_ptr, pair_w_ptr, count_ptr, start_ptr, active_ptr, ro_ptr,
            d_in, stride_xt, stride_xd, stride_ar, stride_ad, stride_ht,
            BT: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
            INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """Expert-major shrink over the active pairs: h[t, o_k:o_k+r_k] = g[t,k] s_k (A_k x[t]).

    grid (cdiv(T, BT), K): program (i, e) takes tokens i*BT.. of the e-th active expert; h [T, R]
    fp32 must be zeroed by the caller (inactive pairs are never written).
    """
    pid_t = tl.program_id(0)
    ex = tl.load(active_ptr + tl.program_id(1))
    if ex < 0:
        return
    count = tl.load(count_ptr + ex)
    if pid_t * BT >= count:
        return
    start = tl.load(start_ptr + ex)
    r0 = tl.load(ro_ptr + ex)
    rk = tl.load(ro_ptr + ex + 1) - r0

    offs_p = pid_t * BT + tl.arange(0, BT)
    m_p = offs_p < count
    tok = tl.load(tok_ptr + start + offs_p, mask=m_p, other=0).to(tl.int64)       # (BT,)
    w = tl.load(pair_w_ptr + start + offs_p, mask=m_p, other=0.0)                 # (BT,)

    for rc in range(0, rk, BR):                  # rank chunks of BR (a bounded tile, any rank)
        offs_r = rc + tl.arange(0, BR)
        m_r = offs_r < rk
        rows = (r0 + offs_r).to(tl.int64)
        acc = _dot_rows(tl.full((BT, BR), 0.0, tl.float32), x_ptr, tok, m_p, stride_xt, stride_xd,
                        a_ptr, rows, m_r, stride_ar, stride_ad, d_in, BK, INTERP_BF16, PREC)
        acc = acc * w[:, None]
        tl.store(h_ptr + tok[:, None] * stride_ht + (r0 + offs_r)[None, :], acc,
                 mask=m_p[:, None] & m_r[None, :])


def _expand(y_ptr, h_ptr, b_ptr, g_ptr, ro_ptr, T, d_out, K,
            stride_yt, stride_yn, stride_ht, stride_bn, stride_br, stride_gt, stride_gk,
            BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
            INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """Token-major expand: y[t, n] += sum_k h[t, o_k:o_k+r_k] . B_k[n, :], h already gated.

    grid (cdiv(T, BT), cdiv(d_out, BN)).  An expert whose gates are zero for every token of the
    block is skipped (its B columns are never read).  Each y element is read and written once by
    one program: deterministic, no atomics.
    """
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_t = offs_t < T
    m_n = offs_n < d_out
    t64 = offs_t.to(tl.int64)
    n64 = offs_n.to(tl.int64)

    acc = tl.full((BT, BN), 0.0, tl.float32)
    for ex in range(K):
        g = tl.load(g_ptr + t64 * stride_gt + ex * stride_gk, mask=m_t, other=0.0)   # (BT,)
        if tl.reduce(tl.abs(g), 0, _MAX) > 0:
            r0 = tl.load(ro_ptr + ex)
            rk = tl.load(ro_ptr + ex + 1) - r0
            for rc in range(0, rk, BR):          # rank chunks of BR
                offs_r = rc + tl.arange(0, BR)
                m_r = offs_r < rk
                cols = (r0 + offs_r).to(tl.int64)
                h = tl.load(h_ptr + t64[:, None] * stride_ht + cols[None, :],
                            mask=m_t[:, None] & m_r[None, :], other=0.0)           # (BT, BR)
                acc = _expand_dot(acc, h, b_ptr, cols, m_r, n64, m_n, stride_bn, stride_br,
                                  INTERP_BF16, PREC)
    y_ptrs = y_ptr + t64[:, None] * stride_yt + n64[None, :] * stride_yn
    m_y = m_t[:, None] & m_n[None, :]
    _store_out(y_ptrs, tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32) + acc, m_y, INTERP_BF16)


def _fused_lora(y_ptr, x_ptr, a_ptr, b_ptr, g_ptr, ro_ptr, scal_ptr, T, d_in, d_out, K,
                stride_yt, stride_yn, stride_xt, stride_xd, stride_ar, stride_ad,
                stride_bn, stride_br, stride_gt, stride_gk,
                BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """Decode path, one launch: shrink and expand per token block, no metadata needed.

    grid (cdiv(T, BT), cdiv(d_out, BN)).  For each expert active in the block:
    h = (x A_k^T) * g[:, k] s_k  (BT, BR), then acc += h B_k[n-block]^T.  Programs of one token
    block recompute h (A_k is re-read from L2, not HBM); inactive experts read nothing.
    """
    offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    m_t = offs_t < T
    m_n = offs_n < d_out
    t64 = offs_t.to(tl.int64)
    n64 = offs_n.to(tl.int64)

    acc = tl.full((BT, BN), 0.0, tl.float32)
    for ex in range(K):
        g = tl.load(g_ptr + t64 * stride_gt + ex * stride_gk, mask=m_t, other=0.0)   # (BT,)
        if tl.reduce(tl.abs(g), 0, _MAX) > 0:
            r0 = tl.load(ro_ptr + ex)
            rk = tl.load(ro_ptr + ex + 1) - r0
            gs = g * tl.load(scal_ptr + ex)
            for rc in range(0, rk, BR):          # rank chunks of BR: the expand is linear in rank
                offs_r = rc + tl.arange(0, BR)
                m_r = offs_r < rk
                rows = (r0 + offs_r).to(tl.int64)
                h = _dot_rows(tl.full((BT, BR), 0.0, tl.float32), x_ptr, t64, m_t, stride_xt,
                              stride_xd, a_ptr, rows, m_r, stride_ar, stride_ad, d_in, BK,
                              INTERP_BF16, PREC)                                   # (BT, BR)
                acc = _expand_dot(acc, h * gs[:, None], b_ptr, rows, m_r, n64, m_n, stride_bn,
                                  stride_br, INTERP_BF16, PREC)
    y_ptrs = y_ptr + t64[:, None] * stride_yt + n64[None, :] * stride_yn
    m_y = m_t[:, None] & m_n[None, :]
    _store_out(y_ptrs, tl.load(y_ptrs, mask=m_y, other=0.0).to(tl.float32) + acc, m_y, INTERP_BF16)


def _linear_shrink(y_ptr, h_ptr, x_ptr, w_ptr, bias_ptr, g_ptr, scal_ptr, eor_ptr,
                   T, d_in, d_out, R,
                   stride_yt, stride_yn, stride_ht, stride_xt, stride_xd, stride_wr, stride_wd,
                   stride_gt, stride_gk,
                   HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   INTERP_BF16: tl.constexpr, PREC: tl.constexpr):
    """One GEMM over W_aug = [W; A_cat] [d_out + R, d_in]: the base GEMM and the shrink together.

    grid (cdiv(T, BM), cdiv(d_out, BN) + cdiv(R, BN)).  Column tiles 0.. are base tiles:
    y[:, n] = x W[n]^T (+ bias[n]), stored in y's dtype.  The remaining tiles are LoRA tiles:
    h[:, j] = (x A_cat[j]^T) * G_exp[:, j] in fp32, G_exp[t, j] = g[t, k(j)] s_k(j).  A LoRA tile
    whose G_exp block is all zero (no token of the block uses its experts) skips the GEMM and
    writes zeros: under top-k routing most of A_cat is never read.
    """
    pid_n = tl.program_id(1)
    n_base = (d_out + BN - 1) // BN
    is_lora = pid_n >= n_base
    lora = is_lora.to(tl.int32)
    col0 = (pid_n - lora * n_base) * BN          # first column within y (base) or h (LoRA)
    row0 = lora * d_out                          # first row of W_aug for this tile's columns
    n_valid = d_out + lora * (R - d_out)

    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    m_m = offs_m < T
    m_n = cols < n_valid
    m64 = offs_m.to(tl.int64)
    c64 = cols.to(tl.int64)

    # G_exp tile: all zeros for base tiles (the mask is off), so `live` is true for them.
    m_g = m_n & (cols * 0 + lora > 0)
    ex = tl.load(eor_ptr + cols, mask=m_g, other=0)
    s = tl.load(scal_ptr + ex, mask=m_g, other=0.0)
    gexp = tl.load(g_ptr + m64[:, None] * stride_gt + ex[None, :] * stride_gk,
                   mask=m_m[:, None] & m_g[None, :], other=0.0) * s[None, :]         # (BM, BN)
    live = (pid_n < n_base) | (tl.reduce(tl.reduce(tl.abs(gexp), 1, _MAX), 0, _MAX) > 0)

    acc = tl.full((BM, BN), 0.0, tl.float32)
    if live:
        acc = _dot_rows(acc, x_ptr, m64, m_m, stride_xt, stride_xd, w_ptr,
                        (row0 + cols).to(tl.int64), m_n, stride_wr, stride_wd, d_in, BK,
                        INTERP_BF16, PREC)
    m_out = m_m[:, None] & m_n[None, :]
    if is_lora:
        tl.store(h_ptr + m64[:, None] * stride_ht + c64[None, :], acc * gexp, mask=m_out)
    else:
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + cols, mask=m_n, other=0.0).to(tl.float32)[None, :]
        _store_out(y_ptr + m64[:, None] * stride_yt + c64[None, :] * stride_yn, acc, m_out,
                   INTERP_BF16)


shrink_kernel = LazyKernel(_shrink)
expand_kernel = LazyKernel(_expand)
fused_lora_kernel = LazyKernel(_fused_lora)
linear_shrink_kernel = LazyKernel(_linear_shrink)
