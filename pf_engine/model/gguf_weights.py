"""A GGUF file's tensors as model weights, without dequantizing them.

``GGUFSource(path, cfg).get(hf_name, shape)`` returns, for the tensor llama.cpp names after
``hf_name`` (gguf_import's name map):

* a QuantWeight (model/qweight.py) for 2-D Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q5_K, Q6_K, F16 and
  BF16 tensors (pf_kernels.quant.FORMATS): their bytes,
  Q and K rows put back in HF's rotary order by the same row permutation gguf_import applies to
  floats (rows are independent), block rows repacked (pf_kernels.quant.repack: the same bytes,
  each field in its own array) for csrc/cpu;
* an fp32 tensor for every other type (F32, 1-D tensors, and the formats csrc/cpu has no kernel
  for, e.g. Q5_1, Q2_K, Q3_K, IQ*: the gguf package dequantizes them).

The header is parsed here (``tensor_index``), not by gguf.GGUFReader, which builds a numpy
array per metadata item (the vocabulary: ~100k of them, seconds and ~100 MB); the tensors are
read with plain file reads, so nothing of the file stays mapped.  gguf_import has validated the
file (it converted it to the HF folder this model's config and tokenizer come from).

GGUF v2/v3 layout: magic "GGUF", u32 version, u64 n_tensors, u64 n_kv, the key/value pairs,
then per tensor (string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset), then the data,
aligned to general.alignment (default 32), each offset relative to the data's start.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass

import numpy as np
import torch
from pf_kernels.quant import GGUF_FORMATS

from pf_engine.errors import LoadError
from pf_engine.model.config import ModelConfig
from pf_engine.model.gguf_import import _hf_name, _unpermute, permutes_qk
from pf_engine.model.qweight import QuantWeight

# GGUF metadata value types -> struct format of a fixed-size value (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]           # torch order (ggml's ne reversed)
    type: int                        # GGMLQuantizationType value
    offset: int                      # absolute, in the file
    n_bytes: int


class _Cursor:
    def __init__(self, buf: bytes, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            v = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise LoadError(f"{self.path}: the GGUF header is truncated") from None
        self.pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.take("I"), self.take("Q")
            if etype in _SCALARS and not keep:       # skip a numeric array in one step
                self.pos += count * struct.calcsize(_SCALARS[etype])
                return None
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else None
        raise LoadError(f"{self.path}: unknown GGUF metadata type {vtype}")


def tensor_index(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a GGUF file by its GGUF name: shape, type, absolute offset, size."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as head:
        c = _Cursor(head, path)
        if c.take("4s") != b"GGUF":
            raise LoadError(f"{path} is not a GGUF file")
        version = c.take("I")
        if version not in (2, 3):
            raise LoadError(f"{path}: GGUF version {version}, expected 2 or 3")
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = c.string(), c.take("I")
            v = c.value(vtype, keep=key == "general.alignment")
            if key == "general.alignment":
                alignment = int(v)
        infos = []
        for _ in range(n_tensors):
            name, nd = c.string(), c.take("I")
            ne = [c.take("Q") for _ in range(nd)]
            ttype, off = c.take("I"), c.take("Q")
            infos.append((name, ne, ttype, off))
        start = -(-c.pos // alignment) * alignment
    out = {}
    for name, ne, ttype, off in infos:
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise LoadError(f"{path}: tensor {name} has unknown type {ttype}") from None
        out[name] = TensorInfo(name, tuple(int(n) for n in reversed(ne)), ttype, start + off,
                               math.prod(ne) // block * size)
    return out


class GGUFSource:
    def __init__(self, path: str, cfg: ModelConfig):
        self.path = path
        self._tensors = {}
        for t in tensor_index(path).values():
            name = _hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self._heads = ({"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
                       if permutes_qk(cfg.architecture) else {})

    def _read(self, t: TensorInfo) -> np.ndarray:
        out = np.empty(t.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(memoryview(out)) != out.size:
                raise LoadError(f"{self.path}: tensor {t.name} is truncated")
        return out

    def has(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str, shape: tuple[int, ...]):
        t = self._tensors.get(name)
        if t is None:
            raise LoadError(f"{self.path}: tensor {name} is missing (expected shape {list(shape)})")
        if tuple(t.shape) != tuple(shape):
            raise LoadError(f"{self.path}: tensor {name} has shape {list(t.shape)}, "
                            f"expected {list(shape)}")
        from gguf.constants import GGMLQuantizationType
        qtype = GGMLQuantizationType(t.type)
        fmt = GGUF_FORMATS.get(qtype.name)
        heads = self._heads.get(name.split(".")[-2])
        raw = self._read(t)
        if fmt is None or len(shape) != 2:
            arr = _float(raw, qtype, shape, self.path, t.name)
            return torch.from_numpy(_unpermute(arr, heads) if heads else arr)
        data = raw.reshape(shape[0], fmt.gguf_row_bytes(shape[1]))
        if heads:
            data = _unpermute(data, heads)
        return QuantWeight.from_gguf(data, fmt, int(shape[1]))


def _float(raw: np.ndarray, qtype, shape, path: str, name: str) -> np.ndarray:
    """A tensor of any other type as fp32 in torch order."""
    import gguf.quants
    if qtype.name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if qtype.name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    try:
        arr = gguf.quants.dequantize(raw.reshape(shape[0] if len(shape) > 1 else 1, -1), qtype)
    except NotImplementedError:
        raise LoadError(f"{path}: tensor {name} is stored as {qtype.name}, which the gguf package "
                        "cannot dequantise") from None
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
