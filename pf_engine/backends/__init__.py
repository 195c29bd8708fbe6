"""The mixing backends: how a ``mixing.Linear`` with attached experts computes

    y = x W^T + b + sum_k g[t,k] s_k B_k A_k x

for a forward's gates (``mixing.Mix``).  One object per backend, looked up once per Mix; each
keeps what it derives from the bank on the Linear's parts (built at first use, then reused) and
what it derives from the gates in ``Mix.cache`` (built once per forward, or per layer under token
routing, and shared by every layer and projection with the same experts).

* ``Torch``: grouped.  [y; h]^T = W_aug x^T is one GEMM (W_aug = [W; A_cat]); then
  y^T += B (G_exp^T * h^T) per projection.  Experts whose gate is zero for the whole batch are
  skipped by gathering the active experts' rows once per active set (the Linear caches the last
  mixing.GATHERED_SETS sets); token routing reads all experts instead.
* ``Naive``: the baseline: a loop over projections and active experts, two small GEMMs each.
* ``Cpu``: csrc/cpu's fused AVX2/OpenMP call per projection group for a decode step's rows.
* ``Kernels`` (triton, cuda): the fused kernels of pf_kernels, one launch per projection (a lone
  projection: base GEMM and shrink in one pass over W_aug).  Each part's RankLayout (rank offsets
  and scalings on the device, pf_kernels.layout) is built at attach; each forward gathers the part's gate columns and
  builds the Triton LoRAMeta once per expert subset, so no layer call reads anything on the host.
"""
from __future__ import annotations

import torch

from pf_kernels.layout import RankLayout

from pf_engine.persona.mix import SMALL_N, Active, Mix, columns, linear, mm
from pf_engine.runtime.threads import user_threads


class Torch:
    name = "torch"

    def linear(self, lin, x2: torch.Tensor, mix: Mix) -> torch.Tensor:
        """x2 [N, d_in] -> y [N, d_out]; works on transposed activations, yT = W xT (``columns``)."""
        xT = columns(x2)                                                    # (d_in, N)
        d_out = lin.d_out
        act = [e for e in mix.active if e in lin.experts]
        # Gather the active experts' rows only when the set holds for the request (explicit and
        # sequence-routed gates); token-routed sets change every layer and step, and re-gathering
        # would copy more than reading all experts once, zero gates included.
        if len(act) == len(lin.experts) or mix.token_router is not None:
            outT = mm(lin.w_aug, xT, lin.bias_aug)                          # (d_out + R, N)
            yT, hT = outT[:d_out], outT[d_out:]
            layout = lin.layout
            parts = [(p.out0, p.out1, p.r0, p.r1, p.b) for p in lin.parts]
        else:
            A = self.gather(lin, tuple(act))
            yT = mm(lin.weight, xT, lin.bias)                               # (d_out, N)
            hT = mm(A.a, xT)                                                # (R_act, N)
            layout, parts = A.layout, A.parts
        hT = hT * mix.expanded(layout, hT.dtype)                            # (R, N) gated
        for o0, o1, r0, r1, b in parts:
            yT[o0:o1] += mm(b, hT[r0:r1])
        return yT.t()

    @staticmethod
    def gather(lin, act: tuple) -> Active:
        """The active experts' rows of A_cat and columns of B, built once per active set."""
        from pf_engine.persona.mix import GATHERED_SETS
        A = lin._active.get(act)
        if A is not None:
            lin._active.move_to_end(act)
            return A
        parts, layouts, rows, r = [], [], [], 0
        for p in lin.parts:
            sub, cols = p.layout.select(act)
            if sub is not None:
                cols_t = torch.tensor(cols, device=p.b.device)
                parts.append((p.out0, p.out1, r, r + len(cols), p.b[:, cols_t].contiguous()))
                layouts.append(sub)
                rows += [lin.d_out + p.r0 + c for c in cols]
                r += len(cols)
        A = Active(lin.w_aug[torch.tensor(rows, device=lin.w_aug.device)].contiguous(),
                   RankLayout.concat(layouts), parts)
        lin._active[act] = A
        if len(lin._active) > GATHERED_SETS:
            lin._active.popitem(last=False)
        return A


class Naive:
    name = "naive"

    def linear(self, lin, x2: torch.Tensor, mix: Mix) -> torch.Tensor:
        """The baseline: for each projection and active expert, y += g s B_k (A_k x)."""
        xT = columns(x2)
        yT = mm(lin.weight, xT, lin.bias)
        active = set(mix.active)
        for p in lin.parts:
            for e, r0, r1, s in p.layout.blocks:
                if e in active:
                    delta = mm(p.b[:, r0:r1], mm(p.a[r0:r1], xT))                # (d_m, N)
                    yT[p.out0:p.out1] += (mix.gates[:, e] * s).to(delta.dtype) * delta
        return yT.t()


class Kernels:
    """triton or cuda: pf_kernels, one launch per projection."""

    def __init__(self, name: str):
        self.name = name

    def inputs(self, p, mix: Mix, triton: bool):
        """(gates of the part's experts [N, n], LoRAMeta or None) for this forward: built once
        per expert subset and shared by every layer and projection with the same experts."""
        key = (self.name, p.layout)
        got = mix.cache.get(key)
        if got is None:
            g = mix.gates[:, p.layout.expert_ids].contiguous()
            meta = None
            if triton:
                from pf_kernels import LoRAMeta
                meta = LoRAMeta.from_layout(g, p.layout)
            got = mix.cache[key] = (g, meta)
        return got

    def linear(self, lin, x2: torch.Tensor, mix: Mix) -> torch.Tensor:
        import pf_kernels
        triton = self.name == "triton"
        if triton and len(lin.parts) == 1 and lin.splits is None:
            p = lin.parts[0]
            g, meta = self.inputs(p, mix, True)
            return pf_kernels.fused_linear(x2, lin.w_aug, p.b, g, p.layout, None, lin.d_out,
                                           bias=lin.bias, meta=meta)
        y = linear(x2, lin.weight, lin.bias)
        for p in lin.parts:
            g, meta = self.inputs(p, mix, triton)
            if triton:
                pf_kernels.grouped_lora(y[:, p.out0:p.out1], x2, p.a, p.b, g, p.layout, None,
                                        meta=meta)
            else:
                pf_kernels.cuda_ops.grouped_lora_cuda(y[:, p.out0:p.out1], x2, p.a, p.b, g,
                                                      p.layout, None)
        return y


class Cpu:
    """csrc/cpu: one fused call per projection group for a decode step's rows on CPU (fp32);
    larger batches (prefill, scoring) take the torch backend's GEMMs."""
    name = "cpu"

    @staticmethod
    def meta(lin) -> dict:
        """The group's parts and blocks as the kernel reads them, checked and built once per
        Linear (the decode hot path passes only pointers)."""
        m = getattr(lin, "cpu_meta", None)
        if m is None:
            parts, bptrs, blocks, scale, bs = [], [], [], [], []
            for p in lin.parts:
                b = p.b.t().contiguous()              # B^T [R_m, d_out_m]: see the kernel's pass 2
                bs.append(b)
                j0 = len(blocks)
                for e, r0, r1, s in p.layout.blocks:
                    blocks.append((e, p.r0 + r0, p.r0 + r1))
                    scale.append(s)
                parts.append((p.out0, p.out1, p.r0, p.r1, j0, len(blocks)))
                bptrs.append(b.data_ptr())
            m = {"parts": torch.tensor(parts, dtype=torch.int64),
                 "bptrs": torch.tensor(bptrs, dtype=torch.int64),
                 "blocks": torch.tensor(blocks, dtype=torch.int64).view(-1, 3),
                 "scale": torch.tensor(scale, dtype=torch.float32), "b": bs}
            ok = lin.w_aug.dtype == torch.float32 and lin.w_aug.is_contiguous() and \
                lin.w_aug.device.type == "cpu" and (lin.bias is None or lin.bias.is_contiguous())
            m["args"] = None if not ok else (
                lin.w_aug.data_ptr(), lin.d_out, lin.w_aug.shape[0] - lin.d_out,
                0 if lin.bias is None else lin.bias.data_ptr())
            m["tail"] = (m["parts"].data_ptr(), m["bptrs"].data_ptr(), len(parts),
                         m["blocks"].data_ptr(), m["scale"].data_ptr(), len(blocks))
            lin.cpu_meta = m
        return m

    def linear(self, lin, x2: torch.Tensor, mix: Mix) -> torch.Tensor:
        m = self.meta(lin)
        N = x2.shape[0]
        if N > SMALL_N or m["args"] is None or x2.dtype != torch.float32 or x2.device.type != "cpu":
            return IMPLEMENTATIONS["torch"].linear(lin, x2, mix)
        x2, g = x2.contiguous(), mix.gates.contiguous()
        y = torch.empty(N, lin.d_out, dtype=torch.float32)
        _cpu_module().fused_linear(x2.data_ptr(), N, x2.stride(0), x2.shape[1], *m["args"],
                                   g.data_ptr(), g.shape[1], g.stride(0), y.data_ptr(), lin.d_out,
                                   *m["tail"], user_threads())
        return y


def _cpu_module():
    from pf_kernels import cpu_ops
    return cpu_ops._load()[0]


IMPLEMENTATIONS = {"torch": Torch(), "naive": Naive(), "triton": Kernels("triton"),
                   "cuda": Kernels("cuda"), "cpu": Cpu()}


def implementation(name: str):
    """The backend object for ``name`` (mixing.BACKENDS)."""
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(IMPLEMENTATIONS)}") from None
