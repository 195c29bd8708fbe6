"""python -m benchmarks: the whole harness in one command.

    python -m benchmarks --quick        # headline rows, under 3 minutes on 2 CPU cores
    python -m benchmarks                # the full sweep (op level and end to end, with peers)

Runs benchmarks/bench_mixing.py (one adapted linear, every backend) and
benchmarks/bench_generate.py (end to end on the bundled model, with transformers and PEFT),
writes their JSON and PNG plots under --out-dir, and rewrites the README's Performance section
from them (--no-readme to leave it).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-peers", action="store_true", help="skip transformers / PEFT rows")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--mixing-args", default="", help="extra flags for bench_mixing.py")
    ap.add_argument("--generate-args", default="", help="extra flags for bench_generate.py")
    args = ap.parse_args(argv)

    from benchmarks import bench_generate, bench_mixing, report
    t0 = time.perf_counter()
    common = ["--device", args.device, "--threads", str(args.threads)]
    quick = ["--quick"] if args.quick else []
    plots = os.path.join(args.out_dir, "plots")
    bench_mixing.run(common + quick + ["--out", os.path.join(args.out_dir, "bench_mixing.json"),
                                       "--plots", plots] + args.mixing_args.split())
    gen = common + quick + ["--out", os.path.join(args.out_dir, "bench_generate.json")]
    if args.model:
        gen += ["--model", args.model]
    if args.no_peers:
        gen.append("--no-peers")
    bench_generate.run(gen + args.generate_args.split())
    report.plot_generate(report.load(os.path.join(args.out_dir, "bench_generate.json")),
                         os.path.join(plots, "generate_decode.png"))
    if not args.no_readme:      # the "Made by" line: this very command, flags and all
        cmd = shlex.join(["python", "-m", "benchmarks"] + list(sys.argv[1:] if argv is None else argv))
        report.update_readme(os.path.join(os.path.dirname(HERE), "README.md"),
                             report.section(args.out_dir, os.path.dirname(HERE), cmd))
    print(f"benchmarks: done in {time.perf_counter() - t0:.0f} s; results in {args.out_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
