"""GGUF rows of any weight format for tests: the gguf package quantizes the 32-blocks; it has no
K-quant quantizer, so q4_k, q5_k and q6_k are made here, plainly (min/max per block, no search
as llama-quantize does).  Any bytes are valid K-quant rows: the tests check csrc/cpu against the
gguf package's *de*quantization of whatever this writes, so only the closeness to w is ours.
"""
import numpy as np

from pf_kernels.quant import FORMATS, quantize
from pf_kernels.quant_pack import _pack_k4


def gguf_rows(w: np.ndarray, fmt: str) -> np.ndarray:
    """w float32 [O, d_in] (d_in a multiple of the format's block) -> GGUF rows uint8."""
    if FORMATS[fmt].qk == 32:
        return quantize(w, FORMATS[fmt])
    return {"q4_k": lambda w: _q45_k(w, 15), "q5_k": lambda w: _q45_k(w, 31), "q6_k": _q6_k}[fmt](w)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _q45_k(w: np.ndarray, nmax: int) -> np.ndarray:
    o, d_in = w.shape
    ns = d_in // 256
    wb = w.reshape(o, ns, 8, 32).astype(np.float64)
    lo = np.minimum(wb.min(-1), 0)
    scale, mins = (wb.max(-1) - lo) / nmax, -lo                               # [O, ns, 8]
    d, dmin = _f16(scale.max(-1) / 63), _f16(mins.max(-1) / 63)               # [O, ns]
    sc = np.clip(np.round(np.divide(scale, d[..., None], out=np.zeros_like(scale), where=d[..., None] > 0)), 0, 63)
    m = np.clip(np.round(np.divide(mins, dmin[..., None], out=np.zeros_like(mins), where=dmin[..., None] > 0)), 0, 63)
    ed = d.astype(np.float64)[..., None] * sc
    em = dmin.astype(np.float64)[..., None] * m
    u = np.divide(wb + em[..., None], ed[..., None], out=np.zeros_like(wb), where=ed[..., None] > 0)
    u = np.clip(np.round(u), 0, nmax).astype(np.uint8)                        # [O, ns, 8, 32]
    qs = (u[:, :, 0::2] & 15) | ((u[:, :, 1::2] & 15) << 4)                   # chunk c: blocks 2c, 2c + 1
    parts = [d[..., None].view(np.uint8), dmin[..., None].view(np.uint8),
             _pack_k4(sc.astype(np.uint8), m.astype(np.uint8))]
    if nmax == 31:
        parts.append(((u >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(2, dtype=np.uint8))   # qh [O, ns, 32]
    parts.append(qs.reshape(o, ns, 128))
    return np.concatenate(parts, -1).reshape(o, -1)


def _q6_k(w: np.ndarray) -> np.ndarray:
    o, d_in = w.shape
    ns = d_in // 256
    wb = w.reshape(o, ns, 16, 16).astype(np.float64)
    scale = np.abs(wb).max(-1) / 31                                          # [O, ns, 16]
    d = _f16(scale.max(-1) / 127)
    sc = np.clip(np.round(np.divide(scale, d[..., None], out=np.zeros_like(scale), where=d[..., None] > 0)), -128, 127)
    sc[..., 1::2] *= -1                                                       # negative scales too
    ed = d.astype(np.float64)[..., None] * sc
    q = np.divide(wb, ed[..., None], out=np.zeros_like(wb), where=ed[..., None] != 0)
    u = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(o, ns, 2, 4, 32)   # half, k, l
    ql = np.concatenate([(u[:, :, :, 0] & 15) | ((u[:, :, :, 2] & 15) << 4),
                         (u[:, :, :, 1] & 15) | ((u[:, :, :, 3] & 15) << 4)], -1)       # [O, ns, 2, 64]
    qh = ((u >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(3, dtype=np.uint8)  # [O, ns, 2, 32]
    return np.concatenate([ql.reshape(o, ns, 128), qh.reshape(o, ns, 64), sc.astype(np.int8).view(np.uint8),
                           d[..., None].view(np.uint8)], -1).reshape(o, -1)
