"""Weight formats stored as bytes: block-quantized (q8_0, q4_0, q4_1, q5_0; the K-quants q4_k,
q5_k, q6_k) and 16-bit floats (f16, bf16); what they are, and the reference (de)quantization
tests and loaders use.

A quantized weight W [O, d_in] is O rows of d_in / 32 blocks with GGUF's (ggml's) block values,
so the ``gguf`` package's numpy code is the reference; GGUF stores each block's fields together:

    format  bytes/block  bits/weight  a block                          value j
    q8_0    34           8.5          fp16 d, int8 q[32]                d q[j]
    q4_0    18           4.5          fp16 d, uint8 n[16]               d (u[j] - 8)
    q4_1    20           5.0          fp16 d, fp16 m, uint8 n[16]       d u[j] + m

with u[j] = n[j] & 15 and u[j + 16] = n[j] >> 4 for j < 16.  The engine keeps each row
``repack``ed once at load into arrays of each field (csrc/cpu/quant.h's RowLayout: the scales of
eight blocks load as one vector, two Q4 blocks' nibbles as one 32-byte load), padding zero:

    q8_0   d fp16 [nb8] | q [nb][32]                     nb = d_in / 32
    q4_0   d fp16 [nb8] | n [nb2][16]                    nb8 = nb rounded up to 8
    q4_1   d fp16 [nb8] | m fp16 [nb8] | n [nb2][16]     nb2 = nb rounded up to 2

``unpack`` is its exact inverse.  q5_0 and the K-quants (super-blocks of 256 values, eight blocks of
32 with integer scales) are repacked by pf_kernels.quant_pack, which has their table.
csrc/cpu dots such rows with activations quantized per block of
32 (``quantize_x_reference``: d = max|x| / 127, q = round(x / d), ties away from zero), in integer
arithmetic, as llama.cpp does.

The 16-bit formats are rows of d_in values as GGUF (and safetensors) store them, read as they are
(one field: repack is the identity) and dotted with fp32 activations (no activation
quantization); bf16 rounds to nearest even when made from float32:

    f16    2 bytes a value   IEEE half
    bf16   2 bytes a value   the upper 16 bits of a float32
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pf_kernels import quant_pack

QK = 32                              # values per block


@dataclass(frozen=True)
class Format:
    name: str                        # q8_0, q4_0, q4_1, f16, bf16, q5_0, q4_k, q5_k, q6_k
    code: int                        # csrc/cpu's FMT_* (quant_format.h)
    block_bytes: int                 # bytes per GGUF block of qk values
    gguf: str                        # gguf.GGMLQuantizationType member name
    qk: int = QK                     # values per GGUF block: d_in must be a multiple of it

    @property
    def half(self) -> bool:
        """A 16-bit float format (no blocks, no activation quantization)."""
        return self.name in ("f16", "bf16")

    @property
    def packed(self) -> bool:
        """Repacked by pf_kernels.quant_pack (not field by field)."""
        return self.name in quant_pack.FORMATS

    def gguf_row_bytes(self, d_in: int) -> int:
        """Bytes of one row as GGUF stores it."""
        return d_in // self.qk * self.block_bytes

    def fields(self, d_in: int) -> dict[str, tuple[int, int, int]]:
        """A repacked row's fields: name -> (offset in the row, bytes per block, offset in a
        GGUF block)."""
        nb = d_in // QK
        n8 = -(-nb // 8) * 8
        if self.half:
            return {"q": (0, 2 * QK, 0)}
        if self.name == "q8_0":
            return {"d": (0, 2, 0), "q": (2 * n8, 32, 2)}
        if self.name == "q4_0":
            return {"d": (0, 2, 0), "q": (2 * n8, 16, 2)}
        return {"d": (0, 2, 0), "m": (2 * n8, 2, 2), "q": (4 * n8, 16, 4)}

    def row_bytes(self, d_in: int) -> int:
        """Bytes of one repacked row (csrc/cpu's row_bytes)."""
        if self.packed:
            return quant_pack.row_bytes(self.name, d_in)
        nb = d_in // QK
        off, size, _ = self.fields(d_in)["q"]
        return off + size * (nb if self.name == "q8_0" or self.half else -(-nb // 2) * 2)

    @property
    def bits(self) -> float:
        return 8.0 * self.block_bytes / self.qk


FORMATS = {f.name: f for f in (Format("q8_0", 1, 34, "Q8_0"), Format("q4_0", 2, 18, "Q4_0"),
                               Format("q4_1", 3, 20, "Q4_1"), Format("f16", 4, 64, "F16"),
                               Format("bf16", 5, 64, "BF16"), Format("q5_0", 6, 22, "Q5_0"),
                               Format("q4_k", 7, 144, "Q4_K", 256),
                               Format("q5_k", 8, 176, "Q5_K", 256),
                               Format("q6_k", 9, 210, "Q6_K", 256))}
GGUF_FORMATS = {f.gguf: f for f in FORMATS.values()}


def _gguf_type(fmt: Format):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[fmt.gguf]


def quantize(w: np.ndarray, fmt: Format) -> np.ndarray:
    """w float32 [O, d_in] (d_in a multiple of 32) -> GGUF rows uint8 [O, fmt.gguf_row_bytes(d_in)]
    (gguf's own quantizer: the bytes llama-quantize would write).  The gguf package has no
    K-quant quantizer: those formats are read from files, not made."""
    if fmt.qk != QK:
        raise ValueError(f"quantizing to {fmt.name} is not supported "
                         "(the gguf package has no K-quant "
                         "quantizer); expected q8_0, q4_0, q4_1, q5_0, f16 or bf16")
    import gguf.quants
    out = gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), _gguf_type(fmt))
    return out.view(np.uint8)                    # f16 comes back as float16


def repack(data: np.ndarray, fmt: Format, d_in: int) -> np.ndarray:
    """GGUF rows uint8 [O, gguf_row_bytes] -> repacked rows uint8 [O, row_bytes]."""
    if fmt.packed:
        return quant_pack.repack(data, fmt.name, d_in)
    nb = d_in // QK
    blocks = np.ascontiguousarray(data).reshape(data.shape[0], nb, fmt.block_bytes)
    out = np.zeros((data.shape[0], fmt.row_bytes(d_in)), dtype=np.uint8)
    for off, size, src in fmt.fields(d_in).values():
        out[:, off:off + size * nb] = blocks[:, :, src:src + size].reshape(data.shape[0], -1)
    return out


def unpack(data: np.ndarray, fmt: Format, d_in: int) -> np.ndarray:
    """Repacked rows -> GGUF rows (``repack``'s inverse)."""
    if fmt.packed:
        return quant_pack.unpack(data, fmt.name, d_in)
    nb = d_in // QK
    out = np.empty((data.shape[0], nb, fmt.block_bytes), dtype=np.uint8)
    for off, size, src in fmt.fields(d_in).values():
        out[:, :, src:src + size] = data[:, off:off + size * nb].reshape(data.shape[0], nb, size)
    return out.reshape(data.shape[0], -1)


def dequantize_reference(data: np.ndarray, fmt: Format) -> np.ndarray:
    """GGUF rows uint8 [O, gguf_row_bytes] -> float32 [O, d_in], by the gguf package (the
    reference; slow), or by numpy's own conversion for the 16-bit formats (exact)."""
    if fmt.half:
        raw = np.ascontiguousarray(data)
        if fmt.name == "f16":
            return raw.view(np.float16).astype(np.float32)
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    import gguf.quants
    return gguf.quants.dequantize(np.ascontiguousarray(data), _gguf_type(fmt)).astype(np.float32)


def quantize_x_reference(x: np.ndarray) -> np.ndarray:
    """x float32 [..., d_in] -> the values csrc/cpu's quantized activations stand for (float64):
    per block of 32, d = max|x| / 127 and q = round(x * (127 / max|x|)), ties away from zero."""
    xb = np.asarray(x, dtype=np.float32).reshape(*x.shape[:-1], -1, QK)
    mx = np.abs(xb).max(-1, keepdims=True)
    d = mx / np.float32(127)
    inv = np.where(mx > 0, np.float32(127) / np.where(mx > 0, mx, np.float32(1)), np.float32(0))
    s = xb * inv.astype(np.float32)
    q = np.trunc(s + np.copysign(np.float32(0.5), s))
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)
