"""pf-bank: build, inspect or randomly make an adapter bank.

    pf-bank build  [--base MODEL_DIR] --expert NAME=PEFT_DIR [--expert ...] -o BANK [--overwrite]
    pf-bank inspect BANK [--json]          BANK: a file or a shipped bank's name (bigfive)
    pf-bank random [--base MODEL_DIR] [--experts a,b,...] [--rank 16] [--modules q,k,...]
                   [--seed 0] [--router] -o BANK [--overwrite]

MODEL_DIR is an HF-layout folder (only its config.json is read); without --base, the bundled
default model's folder.  Errors print one line ``pf-bank: error: ...`` and exit with 2; a failed
build never leaves a partial output file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from pf_engine.errors import PFError


def _base_config(base: str | None):
    from pf_engine.model.config import ModelConfig
    if base is None:
        try:
            from pf_engine.model.bundled import default_model_dir
        except ImportError as e:
            raise PFError(f"no --base given and the bundled default model is unavailable ({e})"
                          ) from None
        base = os.fspath(default_model_dir())
    if not os.path.isdir(base):
        raise PFError(f"--base {base}: no such folder (expected an HF-layout model folder)")
    return ModelConfig.from_file(os.path.join(base, "config.json"))


def _check_output(path: str, overwrite: bool):
    if os.path.exists(path) and not overwrite:
        raise PFError(f"{path} already exists: pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise PFError(f"cannot write {path}: folder {folder} does not exist")


def _summary(bank, path: str) -> str:
    return (f"wrote {path}: {bank.num_experts} experts, modules {','.join(bank.target_modules)}, "
            f"{bank.nbytes / 2**20:.2f} MiB")


def _build(args) -> int:
    from pf_engine.persona.bank import AdapterBank
    experts = {}
    for spec in args.expert:
        name, eq, folder = spec.partition("=")
        if not eq or not name.strip() or not folder.strip():
            raise PFError(f"--expert {spec!r}: expected NAME=PEFT_DIR")
        name = name.strip()
        if name in experts:
            raise PFError(f"--expert {name!r} is given twice")
        experts[name] = folder.strip()
    _check_output(args.output, args.overwrite)
    config = _base_config(args.base)
    bank = AdapterBank.from_peft(config, experts)
    bank.save(args.output, overwrite=args.overwrite)
    print(_summary(bank, args.output), file=sys.stderr)
    return 0


def _random(args) -> int:
    from pf_engine.persona.bank import BIG_FIVE, AdapterBank
    names = [n.strip() for n in args.experts.split(",")] if args.experts else list(BIG_FIVE)
    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    if args.rank < 1:
        raise PFError(f"--rank must be >= 1, got {args.rank}")
    _check_output(args.output, args.overwrite)
    config = _base_config(args.base)
    bank = AdapterBank.random(config, names, rank=args.rank, modules=modules, seed=args.seed,
                              router=args.router)
    bank.save(args.output, overwrite=args.overwrite)
    print(_summary(bank, args.output), file=sys.stderr)
    return 0


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (empty: "none")."""
    runs: list[list[int]] = []
    for l in layers:
        if runs and l == runs[-1][1] + 1:
            runs[-1][1] = l
        else:
            runs.append([l, l])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _inspect(args) -> int:
    from pf_engine.persona.bank import AdapterBank
    bank = AdapterBank.load(args.bank)
    routers = {}
    if bank.router is not None:
        routers["sequence"] = bank.router.config()
    if bank.token_router is not None:
        routers["token"] = bank.token_router.config()
    if args.json:
        print(json.dumps({
            "path": args.bank, "fingerprint": bank.fingerprint, "dtype": str(bank.dtype),
            "bytes": bank.nbytes,
            "experts": [{"name": n, "rank": r, "scaling": s, "modules": bank.expert_modules(k)}
                        for k, (n, r, s) in enumerate(zip(bank.expert_names, bank.ranks,
                                                          bank.scalings))],
            "modules": {m: [bank.expert_names[k] for k in ids]
                        for m, ids in bank.module_experts.items()},
            "layers": {m: bank.layers(m) for m in bank.module_experts},
            "trimmed": bank.trimmed,
            "router": routers or None, "recipe": bank.recipe}, indent=2))
        return 0
    fp = bank.fingerprint
    print(f"bank     {args.bank}")
    print(f"base     {fp['architecture']}, hidden {fp['hidden_size']}, "
          f"{fp['num_hidden_layers']} layers, vocab {fp['vocab_size']}")
    print(f"size     {bank.nbytes:,} bytes ({bank.nbytes / 2**20:.2f} MiB), {bank.dtype}")
    width = max(len(n) for n in bank.expert_names)
    print(f"experts  {bank.num_experts}")
    print(f"  {'#':>2}  {'name':<{width}}  {'rank':>4}  {'scaling':>8}  modules")
    for k, (n, r, s) in enumerate(zip(bank.expert_names, bank.ranks, bank.scalings)):
        print(f"  {k:>2}  {n:<{width}}  {r:>4}  {s:>8.6g}  {','.join(bank.expert_modules(k))}")
    print("modules  " + ", ".join(
        f"{m} ({len(ids)} expert{'s' * (len(ids) != 1)}, R={sum(bank.ranks[k] for k in ids)})"
        for m, ids in bank.module_experts.items()))
    print(f"layers   {layer_ranges(bank.layers())} of 0-{fp['num_hidden_layers'] - 1}"
          + "".join(f"; {m} {layer_ranges(bank.layers(m))}" for m in bank.module_experts
                    if bank.layers(m) != bank.layers())
          + (f" ({bank.trimmed} zero (layer, module) blocks dropped at load)" if bank.trimmed
             else ""))
    if not routers:
        print("router   none (explicit persona weights only)")
    for kind, cfg in routers.items():
        print(f"router   {kind}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if bank.recipe:
        r = bank.recipe
        print(f"recipe   pf-train{' --quick' if r.get('quick') else ''}, data sha256 "
              f"{str(r.get('data_sha256'))[:12]}, seed {r.get('seed')}, commit "
              f"{str(r.get('commit'))[:10]}{' (dirty tree)' if r.get('dirty') else ''}, "
              f"{r.get('train_seconds')} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pf-bank", description="Build or inspect an adapter bank "
                                "(LoRA persona experts stacked for one base model).")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="stack PEFT LoRA folders into a bank")
    b.add_argument("--base", metavar="MODEL_DIR",
                   help="HF-layout model folder (default: the bundled model)")
    b.add_argument("--expert", action="append", required=True, metavar="NAME=PEFT_DIR",
                   help="one expert; repeat, in bank order")
    b.add_argument("-o", "--output", required=True, metavar="BANK")
    b.add_argument("--overwrite", action="store_true", help="replace an existing BANK")
    b.set_defaults(func=_build)

    i = sub.add_parser("inspect", help="print a bank's experts, ranks, modules, router")
    i.add_argument("bank", metavar="BANK")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=_inspect)

    r = sub.add_parser("random", help="a seeded random bank (tests, demos)")
    r.add_argument("--base", metavar="MODEL_DIR",
                   help="HF-layout model folder (default: the bundled model)")
    r.add_argument("--experts", help="comma-separated names (default: the ten Big Five poles)")
    r.add_argument("--rank", type=int, default=16)
    r.add_argument("--modules", default="q,k,v,o,gate,up,down")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--router", action="store_true",
                   help="add random sequence and token routers")
    r.add_argument("-o", "--output", required=True, metavar="BANK")
    r.add_argument("--overwrite", action="store_true", help="replace an existing BANK")
    r.set_defaults(func=_random)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PFError as e:
        print(f"pf-bank: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
