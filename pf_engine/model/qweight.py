"""A weight kept as bytes in one of pf_kernels.quant's formats (8/6/5/4-bit blocks, f16, bf16): the
base projections and the embedding of a model loaded 8-, 4- or 16-bit.

    w = QuantWeight(FORMATS["q4_1"], data, d_in)     data uint8 [O, row_bytes]: repacked rows
    w.shape -> (O, d_in);  w.dtype -> torch.float32 (what its products compute in)
    w.dequantize() -> float32 [O, d_in]              the whole matrix (prefill GEMMs, scoring)
    w.rows(ids)    -> float32 [*ids.shape, d_in]     embedding lookups

``data`` holds the rows repacked from GGUF's layout (pf_kernels.quant.repack: the same bytes,
each field in its own array), which csrc/cpu's kernels read as they are (LinearPlan(fmt=...));
``from_gguf`` takes GGUF's rows.  Dequantizing goes through csrc/cpu when it is built and through
the gguf package (the reference) otherwise.  Rows are independent, so fusing projections (q|k|v)
or permuting rows works on the bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pf_kernels.quant import FORMATS, Format, dequantize_reference, quantize, repack, unpack
from pf_kernels.quant_pack import widen_to_q8_0

from pf_engine.errors import LoadError


@dataclass
class QuantWeight:
    fmt: Format
    data: torch.Tensor               # uint8 [O, fmt.row_bytes(d_in)], C-contiguous, CPU: repacked
    d_in: int

    dtype = torch.float32            # activations and products are fp32
    device = torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.d_in)

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"QuantWeight({self.fmt.name}, shape={list(self.shape)})"

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: Format, name: str = "weight") -> "QuantWeight":
        """w [O, d_in] (d_in a multiple of fmt.qk) quantized to ``fmt``."""
        if w.ndim != 2 or w.shape[1] % fmt.qk:
            raise LoadError(f"{name} has shape {list(w.shape)}; "
                            f"{fmt.name} needs rows of a multiple "
                            f"of {fmt.qk} values")
        return cls.from_gguf(quantize(w.detach().to(torch.float32).cpu().numpy(), fmt), fmt,
                             int(w.shape[1]))

    @classmethod
    def from_gguf(cls, rows: np.ndarray, fmt: Format, d_in: int) -> "QuantWeight":
        """GGUF's rows uint8 [O, fmt.gguf_row_bytes(d_in)], repacked."""
        return cls(fmt, torch.from_numpy(repack(rows, fmt, d_in)), d_in)

    def gguf_rows(self) -> np.ndarray:
        """The rows in GGUF's layout (what llama.cpp would store)."""
        return unpack(self.data.numpy(), self.fmt, self.d_in)

    def widened_to_q8_0(self) -> "QuantWeight":
        """The same values as q8_0
        (from q4_0, q5_0 or q8_0; pf_kernels.quant_pack.widen_to_q8_0)."""
        q8 = FORMATS["q8_0"]
        return QuantWeight.from_gguf(widen_to_q8_0(self.gguf_rows(), self.fmt.name), q8, self.d_in)

    @staticmethod
    def cat(ws: list["QuantWeight"]) -> "QuantWeight":
        """Row-wise concatenation (fused projections); one format and d_in."""
        fmt, d_in = ws[0].fmt, ws[0].d_in
        if any(w.fmt != fmt or w.d_in != d_in for w in ws):
            raise LoadError(f"cannot fuse {', '.join(map(repr, ws))}: expected one format and d_in")
        return QuantWeight(fmt, torch.cat([w.data for w in ws], 0), d_in)

    def _kernel(self):
        from pf_kernels import cpu_ops
        return cpu_ops if cpu_ops.cpu_available()[0] else None

    def dequantize(self, threads: int = 1) -> torch.Tensor:
        """The weight as float32 [O, d_in]."""
        ops = self._kernel()
        if ops is None:
            return torch.from_numpy(dequantize_reference(self.gguf_rows(), self.fmt))
        out = torch.empty(self.shape, dtype=torch.float32)
        ops.dequantize(self.data.numpy(), self.fmt.code, out.numpy(), None, threads)
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (int64, any shape) as float32 [*ids.shape, d_in]."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        ops = self._kernel()
        if ops is None:
            out = torch.from_numpy(dequantize_reference(
                unpack(self.data[flat].numpy(), self.fmt, self.d_in), self.fmt))
        else:
            out = torch.empty(flat.numel(), self.d_in, dtype=torch.float32)
            ops.dequantize(self.data.numpy(), self.fmt.code, out.numpy(), flat.numpy(), 1)
        return out.view(*ids.shape, self.d_in)

