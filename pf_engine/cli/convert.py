"""pf-convert: a Llama GGUF -> an HF-layout folder (config.json, fp32 model.safetensors, tokenizer).

    pf-convert model.Q4_K_M.gguf out/ [--overwrite] [--quiet]
"""
from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pf-convert",
        description="Convert a Llama-architecture GGUF file into an HF-layout folder "
                    "(config.json, fp32 model.safetensors, tokenizer files).")
    p.add_argument("input", metavar="INPUT.gguf", help="the GGUF file to convert")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write (must be empty or new)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is not empty (only once the new folder is complete)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pf_engine.errors import PFError
    from pf_engine.model.gguf_import import convert_gguf, read_marker

    t0 = time.perf_counter()
    try:
        out = convert_gguf(args.input, args.out_dir, overwrite=args.overwrite,
                           progress=not args.quiet)
    except PFError as e:
        print(f"pf-convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pf-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    if not args.quiet:
        m = read_marker(out) or {}
        print(f"pf-convert: wrote {out}: {m.get('tensors', '?')} tensors, "
              f"{m.get('bytes', 0) / 1e6:.1f} MB fp32, {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
