"""The persona experts' format on the cpu backend: chosen once per engine, converted once per
Linear when its plan is built (banks on disk stay fp16/fp32).

    expert_format   A_cat's rows and B^T's rows (csrc/cpu/expert.h)        bytes a value
    "f32"           float32, as attached                                   4
    "bf16"          bfloat16, rounded to nearest even                      2
    "q8"            A_cat: q8_0 blocks of 32 (fp16 scale + int8), GGUF's   1.06 / 1.03
                    Q8_0, dotted with x' quantized per block (as a q8_0 W);
                    B: int8 panels (an fp32 scale per 8 output columns and
                    expert), dotted with h quantized per token and expert
    "auto" (None)   follows the base weight: q8 on a block-quantized W (q8_0, q4_0, q4_1, whose
                    activations are quantized per block anyway), bf16 on a 16-bit W, f32 on an
                    fp32 W (the path tests hold to transformers and PEFT)

A decode step reads the active experts' A_cat rows and B^T rows once: in q8 a top-2 pair of
rank-16 experts on every projection adds ~10% to the bundled 4-bit model's bytes, against ~40%
in fp32 (benchmarks/bench_cpu.py measures the time).  Formats other than f32 need d_in a
multiple of 32 (q8_0's blocks; bf16 rows are laid out as the kernel's 16-bit weights are);
bf16 B^T's rows are zero-padded to a multiple of 32 columns.
Larger fp32 batches that take the torch
backend's GEMMs (prefill chunks over MAX_ROWS rows on an fp32 W) read the fp32 experts.
"""
from __future__ import annotations

import torch
from pf_kernels.quant import FORMATS, QK

from pf_engine.errors import PFError
from pf_engine.model.qweight import QuantWeight

EXPERT_FORMATS = ("auto", "f32", "bf16", "q8")
CODES = {"f32": 0, "bf16": FORMATS["bf16"].code, "q8": FORMATS["q8_0"].code}   # csrc/cpu's FMT_*


def check(expert_format, backend_name: str | None = None) -> str | None:
    """``expert_format`` as given (None for auto), or one PFError line naming what is wrong;
    ``backend_name``: the resolved backend (formats other than f32 run on cpu only)."""
    if expert_format is None or expert_format == "auto":
        return None
    if expert_format not in EXPERT_FORMATS:
        raise PFError(f"expert_format={expert_format!r}: "
                      f"expected one of {', '.join(EXPERT_FORMATS)}")
    if expert_format != "f32" and backend_name not in (None, "cpu"):
        raise PFError(f"expert_format={expert_format!r} with backend={backend_name!r}: "
                      "low-precision "
                      "experts run on the cpu backend only (other backends keep the model's dtype)")
    return expert_format


def choose(expert_format: str | None, lin) -> str:
    """The format of ``lin``'s experts: ``expert_format`` (checked), or auto's rule."""
    if expert_format is None:
        if not lin.quantized or lin.d_in % QK:
            return "f32"
        return "bf16" if lin.weight.fmt.half else "q8"
    if expert_format != "f32" and lin.d_in % QK:
        raise PFError(f"expert_format={expert_format!r}: "
                      f"the adapted layers' inputs have {lin.d_in} "
                      f"values, expected a multiple of {QK} (f32 experts run any size)")
    return expert_format


def _rows(t: torch.Tensor, fmt: str, width: int) -> torch.Tensor:
    """t float32 [n, c] -> uint8 [n, row_bytes] rows of ``width`` >= c values (zero padded)."""
    if t.shape[1] != width:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]))
    t = t.detach().to(torch.float32).contiguous()
    if fmt == "bf16":
        return t.to(torch.bfloat16).view(torch.uint8).reshape(t.shape[0], -1).contiguous()
    return QuantWeight.quantize(t, FORMATS["q8_0"], "expert rows").data


def panels(b: torch.Tensor, spans) -> torch.Tensor:
    """q8 experts' B of one part, b float [dp, r_part], as csrc/cpu/expert.h's panels: for each
    block (rows r0:r1 of the part, ``spans``) ceil(dp / 8) groups of 8 output columns, each an
    fp32 scale s = max |B| over the group / 127 and int8 round(B / s) (half away from zero) in
    quads: [group][rank // 4][column][rank % 4], zero padded.  Returns uint8, flat."""
    dp = b.shape[0]
    G = -(-dp // 8)
    out = []
    for r0, r1 in spans:
        n4 = -(-(r1 - r0) // 4) * 4
        blk = torch.zeros(G * 8, n4, dtype=torch.float32)
        blk[:dp, :r1 - r0] = b[:, r0:r1].detach().float()
        blk = blk.view(G, 8, n4)
        amax = blk.abs().amax(dim=(1, 2))
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        v = blk * inv.view(G, 1, 1)
        q = (torch.trunc(v + torch.copysign(torch.full_like(v, 0.5), v)).clamp(-127, 127)
             .to(torch.int8))
        q = q.view(G, 8, n4 // 4, 4).permute(0, 2, 1, 3).reshape(G, -1)
        s = (amax / 127.0).view(G, 1).contiguous().view(torch.uint8)
        out.append(torch.cat([s, q.view(torch.uint8)], 1).reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)


def convert(lin, fmt: str, blocks=()) -> tuple:
    """(a_cat, [B per part]) of ``lin``'s experts as the kernel reads them in ``fmt``: float32
    A_cat [R, d_in] and B^T [R_m, d_out_m] for f32; uint8 rows of A_cat (d_in values) and B^T
    (d_out_m rounded up to 32) for bf16; for q8, A_cat's q8_0 rows and each part's panels
    (``panels``) of its ``blocks``: (part, expert, r0, r1, scale) in A_cat's rows, as the plan's."""
    if fmt == "f32":
        return lin.a_cat.contiguous(), [p.b.t().contiguous() for p in lin.parts]
    if fmt == "q8":
        spans = [[(r0 - p.r0, r1 - p.r0) for i, _, r0, r1, _ in blocks if i == k]
                 for k, p in enumerate(lin.parts)]
        bts = [panels(p.b, sp) for p, sp in zip(lin.parts, spans)]
        return _rows(lin.a_cat, "q8", lin.d_in), bts
    bts = [_rows(p.b.t(), fmt, -(-p.b.shape[0] // QK) * QK) for p in lin.parts]
    return _rows(lin.a_cat, fmt, lin.d_in), bts


def describe(model) -> str:
    """The experts' formats of a model's adapted Linears, e.g. 'q8' (off the cpu backend: their
    dtype, f32 / bf16 / f16)."""
    names = {v: k for k, v in CODES.items()}
    dtypes = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

    def one(lin):
        plan = getattr(lin.state, "plan", None)
        return (names[plan.expert_fmt] if plan is not None
                else dtypes.get(lin.a_cat.dtype, str(lin.a_cat.dtype)))
    found = {one(lin) for blk in getattr(model, "blocks", ()) for lin in blk.linears if lin.parts}
    return " + ".join(sorted(found)) or "no"
