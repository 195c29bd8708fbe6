"""pf-train: train the ten Big Five persona experts and the situation router into one bank.

    pf-train -o bigfive.safetensors [--data data/personas] [--model M] [--quick] [--overwrite]
             [--peft-dir DIR] [--seed 0] [--steps N] [--pref-steps N | --no-preference]
             [--joint-steps N | --no-joint] [--route-pref-steps N] [--route-pref-situations N]
             [--from BANK] [--raw N] [--arith N] [--kl-first W] [--select-from STEP]
             [--safety N] [--safety-pair W] [--val-safety N]
             [--quantize FMT] [--no-round-activations]
             [--device cpu|cuda] [--dtype bf16|fp16|fp32] [--checkpointing | --no-checkpointing]
             [--max-len N]
             [--quiet]

The experts and the router learn on the base as the engine serves it on the CPU (--quantize, as
pf-generate's; default the model's own: the bundled model's 4-bit file, an HF folder's weights
as stored), through the 8-bit activation rounding of block-quantized weights (train/served.py).
--device cuda trains on a GPU against the model's float weights at --dtype (default bf16, as
the GPU engine serves them; the adapters stay fp32), recomputing the top layers in the backward
pass (gradient checkpointing, on by default there), with the sequence length (--max-len), the
LM head's chunk of tokens and the rows of passes without gradients set by the GPU's free memory
(train/memory.py; the plan is in the bank's metadata); --model takes any HF Llama-family folder
(Llama, Mistral, Qwen2) or a GGUF file.  --from BANK continues from a trained bank: its
experts and router are kept and only the routed preference stage (--route-pref-steps) runs.

Reads only the train split of the data folder.  The full recipe (experts, preference, router,
joint stage) takes 30-38 minutes on two CPU cores for the bundled model (1797 s at 8a025ba on an
Intel Xeon); --quick trains a tiny bank in about three minutes (tests, CI).  Errors print one line
``pf-train: error: ...`` and exit with 2; an interrupted or failed run writes no bank.
"""
from __future__ import annotations

import sys
import time

from pf_engine.cli.common import Parser, fail


def build_parser() -> Parser:
    p = Parser(prog="pf-train", description="Train persona experts (LoRA, peft) and the sequence "
               "router on a persona corpus; write them as one adapter bank.")
    p.add_argument("-o", "--output", required=True, metavar="BANK",
                   help="the bank file to write (.safetensors)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="persona corpus folder (default: data/personas of this checkout)")
    p.add_argument("--model", default=None, help="base model (default: the bundled SmolLM2)")
    p.add_argument("--quick", action="store_true", help="a tiny recipe for tests (a few minutes)")
    p.add_argument("--overwrite", action="store_true", help="replace BANK if it exists")
    p.add_argument("--peft-dir", default=None, metavar="DIR",
                   help="also keep each expert as a PEFT folder DIR/POLE (e.g. DIR/openness+)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the recipe's, 0)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per expert")
    p.add_argument("--pref-steps", type=int, default=None,
                   help="DPO steps per expert in the preference stage (default: the recipe's, 20)")
    p.add_argument("--no-preference", action="store_true", help="skip the preference stage")
    p.add_argument("--joint-steps", type=int, default=None,
                   help="steps of the joint stage, experts and router together on the routed "
                   "mixture (default: the recipe's, 30)")
    p.add_argument("--no-joint", action="store_true", help="skip the joint stage")
    p.add_argument("--route-pref-steps", type=int, default=None, metavar="N",
                   help="DPO steps of the routed preference stage, on auto's own replies to "
                   "train situations (default: the recipe's, 0: no stage)")
    p.add_argument("--route-pref-situations", type=int, default=None, metavar="N",
                   help="train situations auto samples replies to there (default: the "
                   "recipe's, 32)")
    p.add_argument("--from", dest="start", default=None, metavar="BANK",
                   help="continue from this bank (a file or a shipped name): keep its experts "
                   "and router and run only the routed preference stage")
    p.add_argument("--raw", type=int, default=None, metavar="N",
                   help="the base model's raw-text continuations in each step's KL term, so "
                   "experts keep plain completions (default: the recipe's, 2; 0: none)")
    p.add_argument("--arith", type=int, default=None, metavar="N",
                   help="its continuations of arithmetic questions in each step's KL term, so "
                   "experts keep the base's arithmetic (default: the recipe's, 1; 0: none)")
    p.add_argument("--kl-first", type=float, default=None, metavar="W",
                   help="extra KL weight on the first token of those continuations, where an "
                   "expert's empty answer starts (default: the recipe's, 0: none)")
    p.add_argument("--select-from", type=int, default=None, metavar="STEP",
                   help="early stopping keeps no expert state before this step (default: the "
                   "recipe's, 20; 0: any)")
    p.add_argument("--safety", type=int, default=None, metavar="N",
                   help="refusals of the train split's harmful requests (safety.jsonl) in each "
                   "step; its harmless look-alikes then join the KL term (default: the "
                   "recipe's, 0: off; at 2 the experts over-refused, see train/README.md)")
    p.add_argument("--safety-pair", type=float, default=None, metavar="W",
                   help="weight of the contrast that ties each refusal to its harmful request "
                   "against the same refusal after a harmless look-alike (default: the "
                   "recipe's, 1.0; 0: the refusals' likelihood alone)")
    p.add_argument("--val-safety", type=int, default=None, metavar="N",
                   help="keep N harmful requests of safety.jsonl and their look-alikes out of "
                   "training; early stopping then prefers checkpoints that refuse those and "
                   "not the look-alikes (default: the recipe's, 0: off)")
    p.add_argument("--quantize", default=None, choices=("f32", "q8", "q4", "bf16", "f16"),
                   help="train against the base in this format (default: as the engine serves "
                   "the model by default; f32: the float weights, no activation rounding)")
    p.add_argument("--no-round-activations", action="store_true",
                   help="do not train through the served 8-bit activation rounding")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where to train (default cpu)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="the base's compute dtype (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--checkpointing", default=None, action="store_true",
                   help="recompute the top layers in the backward pass (default: on cuda)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens per training sequence at most (default: 512 on the cpu; on "
                   "cuda the longest up to 512 that the GPU's free memory holds)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pf_engine.errors import PFError
    from pf_engine.train import Recipe, train_bank
    from pf_engine.train.data import default_data_dir

    t0 = time.perf_counter()
    recipe = Recipe.quick() if args.quick else Recipe()
    try:
        for name, least in (("seed", 0), ("steps", 1), ("pref_steps", 0), ("joint_steps", 0),
                            ("raw", 0), ("arith", 0), ("select_from", 0), ("safety", 0),
                            ("val_safety", 0), ("max_len", 16),
                            ("route_pref_steps", 0), ("route_pref_situations", 1)):
            value = getattr(args, name)
            if value is not None:
                if value < least:
                    raise PFError(f"--{name.replace('_', '-')} must be >= {least}, got {value}")
                setattr(recipe, name, value)
        for name, field in (("safety_pair", "w_safety_pair"), ("kl_first", "kl_first")):
            value = getattr(args, name)
            if value is not None:
                if not value >= 0:
                    raise PFError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
                setattr(recipe, field, value)
        if args.no_preference:
            recipe.pref_steps = 0
        for name in ("device", "dtype", "checkpointing"):
            if getattr(args, name) is not None:
                setattr(recipe, name, getattr(args, name))
        if args.no_joint:
            recipe.joint_steps = 0
        if args.quantize is not None:
            recipe.quantize = args.quantize
        if args.no_round_activations:
            recipe.round_activations = False
        bank = train_bank(args.data or default_data_dir(), args.output, model=args.model,
                          quick=args.quick, overwrite=args.overwrite, recipe=recipe,
                          peft_dir=args.peft_dir, progress=not args.quiet, start=args.start)
    except PFError as e:
        return fail("pf-train", e)
    except KeyboardInterrupt:
        print("pf-train: interrupted; no bank was written", file=sys.stderr)
        return 130
    if not args.quiet:
        r = bank.recipe["router"]
        print(f"pf-train: wrote {args.output}: {bank.num_experts} experts, rank {bank.ranks[0]}, "
              f"{bank.nbytes / 2**20:.1f} MiB; router layer {r['layer']}; "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
