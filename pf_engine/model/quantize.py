"""What ``quantize=`` means, in one place.

    quantize   an HF folder (float weights)              a GGUF file (the bundled model)
    None       as stored (fp32 by default)               its own formats: Q8_0, Q4_0, Q4_1, Q5_0,
                                                          Q4_K, Q5_K, Q6_K, F16, BF16 tensors kept
                                                          as they are
    "f32"      as stored                                 every tensor dequantized to fp32
    "q8"       projections and embedding -> q8_0          refused: the file decides its formats
    "q4"       projections -> q4_1, embedding -> q8_0     refused
                 (llama.cpp's Q4_1 recipe, the bundled file's)
    "bf16"     projections and embedding -> bf16          refused
    "f16"      projections and embedding -> f16           refused

Weights stored as bytes (8/4-bit blocks, 16-bit floats: pf_kernels.quant) run on the cpu backend
in fp32 activations; norms, biases and the persona experts stay fp32 beside them.
Every wrong combination is one PFError line (``check``).
"""
from __future__ import annotations

import torch
from pf_kernels.quant import FORMATS, Format
from pf_kernels.quant_pack import WIDENS_TO_Q8_0

from pf_engine.errors import PFError
from pf_engine.model.qweight import QuantWeight

QUANTIZE = ("f32", "bf16", "f16", "q8", "q4")
# mode -> (format of the projections, format of the embedding and head)
RECIPES: dict[str, tuple[Format, Format]] = {
    "q8": (FORMATS["q8_0"], FORMATS["q8_0"]),
    "q4": (FORMATS["q4_1"], FORMATS["q8_0"]),
    "bf16": (FORMATS["bf16"], FORMATS["bf16"]),
    "f16": (FORMATS["f16"], FORMATS["f16"]),
}


def check(quantize, *, gguf: bool, device: torch.device, dtype: torch.dtype, backend) -> str | None:
    """``quantize`` as given (None: the default), or a PFError naming what is wrong.

    ``gguf``: the model comes from a GGUF file; ``backend``: the resolved backend (its
    ``quantized`` says whether it runs block-quantized weights) or None before it is known."""
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise PFError(f"quantize={quantize!r}: expected one of {', '.join(QUANTIZE)} (or None)")
    if quantize == "f32":
        return quantize
    if gguf:
        raise PFError(f"quantize={quantize!r} with a GGUF model: its tensors keep the file's own "
                      "formats (pass no quantize), or quantize='f32' dequantizes them")
    if device.type != "cpu":
        raise PFError(f"quantize={quantize!r} on {device.type}: "
                      "quantized weights run on the CPU only")
    if dtype != torch.float32:
        raise PFError(f"quantize={quantize!r} with dtype={str(dtype).replace('torch.', '')}: "
                      "quantized "
                      "weights compute in fp32 (pass dtype fp32)")
    if backend is not None and not backend.quantized:
        raise PFError(f"quantize={quantize!r} with backend={backend.name!r}: quantized weights run "
                      "on the cpu backend only")
    return quantize


def recipe(quantize: str | None) -> tuple[Format, Format] | None:
    return RECIPES.get(quantize) if quantize else None


def apply(rec, t: torch.Tensor, kind: str, name: str):
    """A float tensor of ``kind`` (proj, embed, float) under recipe ``rec``: quantized or as is."""
    if rec is None or kind == "float":
        return t
    return QuantWeight.quantize(t, rec[0] if kind == "proj" else rec[1], name)


def cat(ws):
    """Fused projections: one QuantWeight when all share a format or widen to q8_0 exactly
    (q4_0 / q5_0 beside q8_0, as llama.cpp's Q4_K_M stores some layers' q, k, v), else fp32."""
    if all(isinstance(w, torch.Tensor) for w in ws):
        return torch.cat(ws, 0)
    if all(isinstance(w, QuantWeight) for w in ws) and len({w.d_in for w in ws}) == 1:
        if len({w.fmt for w in ws}) == 1:
            return QuantWeight.cat(ws)
        if all(w.fmt.name in WIDENS_TO_Q8_0 for w in ws):
            return QuantWeight.cat([w.widened_to_q8_0() for w in ws])
    return torch.cat([w if isinstance(w, torch.Tensor) else w.dequantize() for w in ws], 0)


def describe(weights) -> str:
    """The formats of a ModelWeights' projections and embedding, e.g. 'q4_1 + q8_0 embedding'."""
    def fmt(w):
        return w.fmt.name if isinstance(w, QuantWeight) else str(w.dtype).replace("torch.", "")
    projs = sorted({fmt(getattr(l, n)) for l in weights.layers
                    for n in ("qkv", "o", "gate_up", "down")})
    return f"{'/'.join(projs)} + {fmt(weights.embed)} embedding"
