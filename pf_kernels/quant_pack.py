"""Repacking of the formats whose values csrc/cpu reads in another order than GGUF stores them:
q5_0 and the K-quants q4_k, q5_k, q6_k (pf_kernels.quant has the others, field by field).

GGUF's blocks (ggml's block_q5_0, block_q4_K, block_q5_K, block_q6_K; nb = d_in / 32 blocks of
32 values, ns = d_in / 256 super-blocks of eight blocks):

    q5_0  22 bytes / 32   fp16 d, u32 qh, uint8 n[16]         w = d (u - 16)
    q4_k 144 bytes / 256  fp16 d, fp16 dmin, scales[12], n[128]        w = d sc_b u - dmin m_b
    q5_k 176 bytes / 256  fp16 d, fp16 dmin, scales[12], qh[32], n[128]
    q6_k 210 bytes / 256  ql[128], qh[64], int8 sc[16], fp16 d          w = d sc_s (u - 32)

(u: a value's unsigned bits; q5_0's fifth bit j is bit j of qh; a K-quant block b of 32 has 6-bit
sc_b and m_b packed in ``scales``; q6_k scales per 16 values.)  csrc/cpu's rows (quant_format.h's
row_layout, in this order; n2 = nb rounded up to 2, nb8 to 8; pairs: blocks 2p, 2p + 1):

    q5_0  d fp16 [nb8] | h u32 [n2 / 2][2] | n [n2][16]
    q4_k  d fp16 [ns] | dmin fp16 [ns] | sc u8 [nb] | m u8 [nb] | n [nb][16]
    q5_k  d fp16 [ns] | dmin fp16 [ns] | sc u8 [nb] | m u8 [nb] | h u32 [nb / 2][2] | n [nb][16]
    q6_k  d fp16 [ns] | sc int8 [ns][16] | (ql [128], qh [64]) [ns]      (q6_k's values as stored)

A pair's 32 nibble bytes hold its values as q4_0's do: low nibbles [A 0:16 | B 0:16], high
nibbles [A 16:32 | B 16:32] (q5_0 and q4_0 store each block's nibbles so already; the K-quants'
64-value chunks, low nibbles block A and high nibbles block B, are reordered), and a pair's two
words of fifth bits follow the same order (word 0: A 0:16 then B 0:16; word 1: A 16:32, B 16:32).
The K-quants' 6-bit scales and mins are widened to a byte each (148 and 180 bytes a super-block
instead of 144 and 176).  ``unpack`` inverts ``repack`` exactly.
"""
from __future__ import annotations

import numpy as np

QK, QK_K = 32, 256
GGUF_BLOCK = {"q5_0": (QK, 22), "q4_k": (QK_K, 144), "q5_k": (QK_K, 176), "q6_k": (QK_K, 210)}
FORMATS = tuple(GGUF_BLOCK)


def _r(n: int, m: int) -> int:
    return -(-n // m) * m


def fields(name: str, d_in: int) -> list[tuple[str, int, int]]:
    """A repacked row's fields in order: (name, offset, bytes)."""
    nb, ns = d_in // QK, d_in // QK_K
    n2 = _r(nb, 2)
    sizes = {"q5_0": [("d", 2 * _r(nb, 8)), ("h", 4 * n2), ("n", 16 * n2)],
             "q4_k": [("d", 2 * ns), ("dmin", 2 * ns), ("sc", nb), ("m", nb), ("n", 16 * nb)],
             "q5_k": [("d", 2 * ns), ("dmin", 2 * ns), ("sc", nb), ("m", nb), ("h", 4 * nb),
                      ("n", 16 * nb)],
             "q6_k": [("d", 2 * ns), ("sc", 16 * ns), ("q", 192 * ns)]}[name]
    out, off = [], 0
    for f, n in sizes:
        out.append((f, off, n))
        off += n
    return out


def row_bytes(name: str, d_in: int) -> int:
    _, off, n = fields(name, d_in)[-1]
    return off + n


# -- the pieces ------------------------------------------------------------------------------

def _pair_nibbles(a: np.ndarray) -> np.ndarray:
    """K-quant chunks [..., 32] (low nibbles block A, high block B) -> pair order; an involution
    up to the inverse below."""
    lo, hi = a[..., :16], a[..., 16:]
    return np.concatenate([(lo & 15) | ((hi & 15) << 4), (lo >> 4) | (hi & 0xF0)], -1)


def _chunk_nibbles(p: np.ndarray) -> np.ndarray:
    """_pair_nibbles' inverse."""
    a, b = p[..., :16], p[..., 16:]
    return np.concatenate([(a & 15) | ((b & 15) << 4), (a >> 4) | (b & 0xF0)], -1)


def _pair_words(bits: np.ndarray) -> np.ndarray:
    """Fifth bits [O, nb2, 32] (one per value, nb2 even) -> their pair words as bytes
    [O, nb2 * 4]."""
    a, b = bits[:, 0::2], bits[:, 1::2]
    words = np.stack([np.concatenate([a[..., :16], b[..., :16]], -1),
                      np.concatenate([a[..., 16:], b[..., 16:]], -1)], 2)          # [O, p, 2, 32]
    return np.packbits(words, -1, bitorder="little").reshape(bits.shape[0], -1)


def _word_bits(data: np.ndarray, nb2: int) -> np.ndarray:
    """_pair_words' inverse: bytes [O, nb2 * 4] -> bits [O, nb2, 32]."""
    w = np.unpackbits(np.ascontiguousarray(data).reshape(data.shape[0], nb2 // 2, 2, 4), -1,
                      bitorder="little")
    out = np.empty((data.shape[0], nb2, 32), dtype=np.uint8)
    for k in range(2):
        out[:, 0::2, 16 * k:16 * k + 16] = w[:, :, k, :16]
        out[:, 1::2, 16 * k:16 * k + 16] = w[:, :, k, 16:]
    return out


def _scales_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's 12 bytes of 6-bit scales [..., 12] -> (sc [..., 8], m [..., 8]) (get_scale_min_k4)."""
    q = s.astype(np.uint8)
    sc = np.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)], -1)
    m = np.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], -1)
    return sc, m


def _pack_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """_scales_k4's inverse."""
    return np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6),
                           m[..., :4] | ((m[..., 4:] >> 4) << 6),
                           (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], -1).astype(np.uint8)


def _k_fifth_bits(qh: np.ndarray) -> np.ndarray:
    """q5_k's qh [O, ns, 32] -> fifth bits [O, ns * 8, 32]: block 2c + e's value l is bit 2c + e
    of qh[l]."""
    o, ns, _ = qh.shape
    return ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1).reshape(
        o, ns * 8, 32)


def _k_qh(bits: np.ndarray) -> np.ndarray:
    o, nb, _ = bits.shape
    b = bits.reshape(o, nb // 8, 8, 32).astype(np.uint8)
    return (b << np.arange(8, dtype=np.uint8)[None, None, :, None]).sum(2, dtype=np.uint8)


# -- repack / unpack ---------------------------------------------------------------------------

def repack(data: np.ndarray, name: str, d_in: int) -> np.ndarray:
    """GGUF rows uint8 [O, d_in / qk * block bytes] -> csrc/cpu's rows
    [O, row_bytes(name, d_in)]."""
    qk, bb = GGUF_BLOCK[name]
    o, nb = data.shape[0], d_in // QK
    blk = np.ascontiguousarray(data).reshape(o, d_in // qk, bb)
    parts = {}
    if name == "q5_0":
        n2 = _r(nb, 2)
        d = np.zeros((o, _r(nb, 8) * 2), np.uint8)
        d[:, :2 * nb] = blk[:, :, 0:2].reshape(o, -1)
        bits = np.zeros((o, n2, 32), np.uint8)
        bits[:, :nb] = np.unpackbits(blk[:, :, 2:6], -1, bitorder="little")  # qh, little-endian
        n = np.zeros((o, n2, 16), np.uint8)
        n[:, :nb] = blk[:, :, 6:22]
        parts = {"d": d, "h": _pair_words(bits), "n": n.reshape(o, -1)}
    elif name in ("q4_k", "q5_k"):
        sc, m = _scales_k4(blk[:, :, 4:16])
        nib = blk[:, :, -128:].reshape(o, -1, 32)
        parts = {"d": blk[:, :, 0:2].reshape(o, -1), "dmin": blk[:, :, 2:4].reshape(o, -1),
                 "sc": sc.reshape(o, -1), "m": m.reshape(o, -1),
                 "n": _pair_nibbles(nib).reshape(o, -1)}
        if name == "q5_k":
            parts["h"] = _pair_words(_k_fifth_bits(blk[:, :, 16:48]))
    else:                                                                        # q6_k
        parts = {"d": blk[:, :, 208:210].reshape(o, -1), "sc": blk[:, :, 192:208].reshape(o, -1),
                 "q": blk[:, :, 0:192].reshape(o, -1)}
    out = np.empty((o, row_bytes(name, d_in)), np.uint8)
    for f, off, size in fields(name, d_in):
        out[:, off:off + size] = parts[f]
    return out


def unpack(rows: np.ndarray, name: str, d_in: int) -> np.ndarray:
    """repack's inverse: csrc/cpu's rows -> GGUF rows."""
    qk, bb = GGUF_BLOCK[name]
    o, nb = rows.shape[0], d_in // QK
    p = {f: rows[:, off:off + size] for f, off, size in fields(name, d_in)}
    blk = np.empty((o, d_in // qk, bb), np.uint8)
    if name == "q5_0":
        n2 = _r(nb, 2)
        blk[:, :, 0:2] = p["d"][:, :2 * nb].reshape(o, nb, 2)
        blk[:, :, 2:6] = np.packbits(_word_bits(p["h"], n2)[:, :nb], -1, bitorder="little")
        blk[:, :, 6:22] = p["n"].reshape(o, n2, 16)[:, :nb]
    elif name in ("q4_k", "q5_k"):
        ns = nb // 8
        blk[:, :, 0:2] = p["d"].reshape(o, ns, 2)
        blk[:, :, 2:4] = p["dmin"].reshape(o, ns, 2)
        blk[:, :, 4:16] = _pack_k4(p["sc"].reshape(o, ns, 8), p["m"].reshape(o, ns, 8))
        blk[:, :, -128:] = _chunk_nibbles(p["n"].reshape(o, -1, 32)).reshape(o, ns, 128)
        if name == "q5_k":
            blk[:, :, 16:48] = _k_qh(_word_bits(p["h"], nb))
    else:
        ns = nb // 8
        blk[:, :, 208:210] = p["d"].reshape(o, ns, 2)
        blk[:, :, 192:208] = p["sc"].reshape(o, ns, 16)
        blk[:, :, 0:192] = p["q"].reshape(o, ns, 192)
    return blk.reshape(o, -1)


# -- exact widening --------------------------------------------------------------------------

WIDENS_TO_Q8_0 = {"q4_0": (18, 8), "q5_0": (22, 16), "q8_0": (34, 0)}   # block bytes, zero point


def widen_to_q8_0(data: np.ndarray, name: str) -> np.ndarray:
    """GGUF rows of q4_0, q5_0 or q8_0 -> the same values as q8_0 GGUF rows, exactly: a block
    keeps its fp16 d and its values u - zero point (in [-16, 15]) become int8 q.  What a fused
    projection of mixed 32-blocks (llama.cpp's Q4_K_M puts some v in q8_0 beside q, k in q5_0)
    is stored as."""
    bb, zero = WIDENS_TO_Q8_0[name]
    o = data.shape[0]
    blk = np.ascontiguousarray(data).reshape(o, -1, bb)
    if name == "q8_0":
        return blk.reshape(o, -1).copy()
    n = blk[:, :, -16:]
    u = np.concatenate([n & 15, n >> 4], -1).astype(np.int16)                 # [O, nb, 32]
    if name == "q5_0":
        qh = blk[:, :, 2:6].copy().view(np.uint32)                              # [O, nb, 1]
        u |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)
    out = np.empty((o, blk.shape[1], 34), np.uint8)
    out[:, :, 0:2] = blk[:, :, 0:2]
    out[:, :, 2:] = (u - zero).astype(np.int8).view(np.uint8)
    return out.reshape(o, -1)
