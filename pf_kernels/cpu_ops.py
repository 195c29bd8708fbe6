"""csrc/cpu's kernels for CPU decode steps (AVX2/FMA): the fused grouped-LoRA linear, decode
attention and a decoder block's whole decode step.

The module is optional: built by setup.py (or ``python csrc/cpu/build.py``); ``cpu_available``
says why not when it is missing or the CPU lacks AVX2/FMA (checked before importing it, so an
old CPU never executes its instructions).

Typed API (re-exported here from ``pf_kernels._pf_cpu`` once it loads; numpy arrays, e.g.
``tensor.numpy()`` views that share the tensor's memory; every check raises one ValueError line,
TypeError for a wrong dtype, naming the argument, and nothing is written when one fails):

    MAX_ROWS = 16                                 rows per call (B) of decode_attention and
                                                  BlockPlan.step; a LinearPlan's token group
    MAX_LINEAR_ROWS = 4096                        rows per LinearPlan.run call (T)
    PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2

    LinearPlan(weight, d_out, bias=None, parts=(), blocks=(), num_experts=0, fmt=FMT_F32,
               a_cat=None, d_in=0)
        One projection group, checked once; keeps its arrays alive.
        weight FMT_F32: float32 [d_out + R, d_in] C-contiguous, W above A_cat (R = 0: a plain
               linear); any other fmt (pf_kernels.quant.FORMATS: q8_0, q4_0, q4_1, f16, bf16):
               uint8 [d_out, row_bytes(fmt, d_in)], W's stored rows, with A_cat float32
               [R, d_in] as a_cat and d_in given
        bias   float32 [d_out] or None
        parts  [(out0, out1, r0, r1, bT)]: columns out0:out1 take rows r0:r1 of A_cat (0-based
               in R); bT float32 [r1 - r0, out1 - out0] C-contiguous (B transposed); increasing,
               non-overlapping in both ranges
        blocks [(part, expert, r0, r1, scale)]: an expert's absolute rows r0:r1 of A_cat in that
               part, sorted by part, 0 <= expert < num_experts
        properties d_in, d_out, rank (R), num_experts
      .run(x, y, gates=None, threads=1, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)
        y[t, o] = residual[t, o] + W[o] . x'[t] + bias[o]
                  + sum over active blocks j of o's part: sum_{r in j} bT[r - r0, o - out0] h[t, r]
        h[t, r] = (A_cat[r] . x'[t]) * gates[t, e_j] * s_j
        x' = x (PRO_NONE) | norm * x / sqrt(mean(x^2) + eps) (PRO_RMSNORM)
           | silu(x[:, :d_in]) * x[:, d_in:] (PRO_SILU_MUL, x [T, 2 d_in])
        x [T, d_in] unit last stride (any row stride), 1 <= T <= MAX_LINEAR_ROWS (dotted in
        groups of MAX_ROWS tokens against each chunk of W's rows, so W streams from memory
        once; a token's y does not depend on T or its place); y [T, d_out] written;
        gates [T, num_experts] or None (base only: every expert skipped); residual [T, d_out] or
        None, may be y itself.  GIL released.

    decode_attention(qkv, cos, sin, k_cache, v_cache, layer, row0, cols, bias, out, threads=1,
                     slots=None)
        RoPE on q and k, k and v written at column cols[b] of slot row0 + b (or slots[b]) of
        ``layer``, GQA attention over columns [0, L) with the additive bias (0 or -inf) into
        out [B, H*D]; every k, v is written before any head reads, and each (row, head) sums
        its columns in order, masked ones skipped (a row's result does not depend on the other
        rows or on L).  qkv [B, (H + 2 H_kv) D]; cos, sin [B, H + H_kv, D]; k_cache, v_cache
        [layers, slots, H_kv, max_len, D] (the whole pool); cols int64 [B]; bias [B, L];
        slots int64 [B] (rows may share a slot: the tokens of a prefill chunk).

    BlockPlan(qkv, o, gate_up, down, attn_norm, mlp_norm, eps, n_heads, n_kv_heads, head_dim)
      .step(h, gates, cos, sin, k_cache, v_cache, layer, row0, cols, bias, threads=1, group=None)
        One decoder block's decode step in one call, h [B, d] C-contiguous updated in place:
        qkv = W_qkv rmsnorm(h); a = decode_attention(qkv); h += W_o a;
        gu = W_gu rmsnorm(h); h += W_down silu(gate) * up   (each + experts under ``gates``).
        With a ShmGroup (a tensor-parallel shard): h = allreduce(h + W_o a) on rank 0 and
        allreduce(W_o a) on the others, the same after down.

    ShmGroup(segment, rank, world, capacity, timeout_s), ShmGroup.layout_bytes(world, capacity)
      .allreduce(x)   x float32 <- the sum over the processes mapping ``segment`` (rank order,
                      bit-identical everywhere); .abort(); properties rank, world, capacity,
                      rounds, aborted.  csrc/cpu/shm_group.h has the layout and the protocol.

    FMT_F32, FMT_Q8_0, FMT_Q4_0, FMT_Q4_1, FMT_F16, FMT_BF16; row_bytes(fmt, d_in);
    dequantize(weight, fmt, out, rows=None, threads=1)    stored rows -> float32

    isa(), isas(), set_isa(name)
        The instruction set of the block formats' dots (csrc/cpu/isa.h): amx, avx512vnni,
        avxvnni or avx2, the best this CPU has unless PF_CPU_ISA (read at load) or set_isa picks
        another; all give bit-identical outputs (but for a bf16 W's tiles, below).
        isas(): [(name, CPU features, supported here)].
    bf16_tiles()
        Whether a bf16 W's calls of 6 tokens or more take AMX-BF16 tiles here (amx in use on a
        CPU with AMX-BF16: csrc/cpu/amx_bf16.h), rounding x' to bf16; LinearPlan.bf16_tiles =
        False keeps such a plan on the fp32-activation dots.

    set_spin_us(us), spin_us(), pool_workers()
        The typed API runs on its own thread pool, not OpenMP: ``threads`` counts the caller
        (1 runs inline); work is claimed in small chunks by the workers and the caller, so the
        caller never waits for a worker that has not started; idle threads spin at most
        spin_us() microseconds (default 50), then sleep.  A call made while another thread's call
        holds the pool runs inline.
"""
from __future__ import annotations

import functools
import os


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why not)."""
    flags = _cpu_flags()
    if not {"avx2", "fma", "f16c"} <= flags:
        return None, "this CPU lacks AVX2/FMA/F16C (or /proc/cpuinfo is unreadable)"
    try:
        from . import _pf_cpu
    except ImportError as e:
        return None, (f"the CPU extension is not built ({e}); build it with "
                      "python csrc/cpu/build.py or reinstall")
    want = os.environ.get("PF_CPU_ISA")
    if want:
        try:
            _pf_cpu.set_isa(want)
        except ValueError as e:
            raise ValueError(f"PF_CPU_ISA={want!r}: {str(e).removeprefix('set_isa: ')}") from None
    return _pf_cpu, None


_TYPED = ("MAX_ROWS", "MAX_LINEAR_ROWS", "PRO_NONE", "PRO_RMSNORM", "PRO_SILU_MUL", "LinearPlan",
          "BlockPlan", "decode_attention", "set_spin_us", "spin_us", "pool_workers", "FMT_F32",
          "FMT_Q8_0", "FMT_Q4_0", "FMT_Q4_1", "FMT_F16", "FMT_BF16", "row_bytes", "dequantize",
          "isa", "isas", "set_isa", "bf16_tiles", "ShmGroup")


def __getattr__(name: str):
    """The typed API's names, looked up in the module once it loads (see the module doc)."""
    if name in _TYPED:
        mod, why = _load()
        if mod is None:
            raise AttributeError(f"pf_kernels.cpu_ops.{name} is unavailable: {why}")
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cpu_available() -> tuple[bool, str]:
    mod, why = _load()
    return ((True, f"AVX2/FMA fused kernel (csrc/cpu, {mod.isa()} block dots)") if mod is not None
            else (False, why))
