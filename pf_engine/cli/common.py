"""What every CLI shares: a parser whose errors are one line, and the error-to-exit-code rule."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags that choose how an engine is built, shared by pf-generate and pf-serve."""
    p.add_argument("--model", default=None,
                   help="HF-layout folder or .gguf (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", default=None,
                   help="persona adapter bank: a .safetensors file or a shipped name (bigfive)")
    p.add_argument("--backend", default=None,
                   help="how layers run and experts mix: auto (default), cpu, torch, naive, "
                        "triton, cuda")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None,
                   help="fp32, fp16 or bf16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N ranks: this process and N - 1 workers (CPU: "
                        "--threads each, shared-memory all-reduces; CUDA: one GPU each, nccl)")
    p.add_argument("--expert-format", default=None, metavar="F",
                   help="persona experts on the cpu backend: auto "
                        "(default: q8 on an 8/4-bit model, "
                        "bf16 on a 16-bit one, f32 on fp32), f32, bf16 or q8")
    p.add_argument("--deterministic", action="store_true",
                   help="greedy tokens independent of the batch on fp32 weights too (cpu "
                        "backend; about half the fp32 prefill throughput). A model stored as "
                        "bytes (the bundled 4-bit one) is batch-invariant without it")
    from pf_engine.model.quantize import QUANTIZE
    p.add_argument("--quantize", default=None, choices=QUANTIZE,
                   help="weights: q8 / q4 / bf16 / f16 convert an HF folder's at load "
                        "(cpu backend); "
                        "f32 dequantizes a GGUF's (default: a GGUF's own formats "
                        "on the cpu backend, "
                        "an HF folder's as stored)")


def check_engine_args(args, persona=None) -> None:
    """Every engine flag (and a persona spec) checked before anything is loaded: a PFError names
    the first bad value.  Sets torch's thread count for --threads."""
    from pf_engine.backends import check_name
    from pf_engine.backends.cpu.experts import check as check_expert_format
    from pf_engine.engine import resolve_device, resolve_dtype
    from pf_engine.errors import PFError
    from pf_engine.persona.specs import parse_spec
    check_name(args.backend)
    check_expert_format(args.expert_format)
    resolve_dtype(args.dtype, resolve_device(args.device))
    if persona is not None:
        parse_spec(persona)
    if args.tensor_parallel < 1:
        raise PFError(f"--tensor-parallel {args.tensor_parallel}: expected an integer >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise PFError(f"--threads {args.threads}: expected an integer >= 1")
        import torch
        torch.set_num_threads(args.threads)


def fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2
