"""A model folder with a real model's config and tokenizer but seeded random weights, for timing.

    python benchmarks/random_weights.py SRC OUT [--seed 0]

SRC is an HF folder (config.json, tokenizer files; its weights are not read, and need not be
there); OUT gets the same config and tokenizer files and a model.safetensors of random weights
of that shape (transformers' own initialisation, fp32 on disk).  For a machine that cannot get
the real weights (a lent GPU box has no network): decode speed does not depend on the values,
and bench_generate ignores EOS, so every row still makes exactly N tokens.  The folder name
should say "random" so that results that used it say so (bench_generate records the path).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json", "chat_template.jinja")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.src, "config.json")):
        ap.error(f"{args.src!r} has no config.json; expected an HF model folder")
    import torch
    import transformers
    os.makedirs(args.out, exist_ok=True)
    for name in FILES:
        if os.path.isfile(os.path.join(args.src, name)):
            shutil.copy(os.path.join(args.src, name), os.path.join(args.out, name))
    cfg = transformers.AutoConfig.from_pretrained(args.src)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {cfg.architectures[0]}, {n / 1e6:.1f}M random parameters (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
