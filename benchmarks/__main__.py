"""python -m benchmarks: the op-level and end-to-end harness in one command.

    python -m benchmarks --quick            # headline rows, a few minutes on 2 CPU cores
    python -m benchmarks                    # the full sweep (op level and end to end, with peers)
    python -m benchmarks --quick --readme   # ... into benchmarks/results/, then the README's
                                            # Performance block and benchmarks/RESULTS.md

Runs benchmarks/bench_mixing.py (one adapted linear, every backend) and
benchmarks/bench_generate.py (end to end on the bundled model, with transformers and PEFT) and
writes their JSON and plots under --out-dir (default $PF_BENCH_DIR or /tmp/pf-bench: the
committed results are left alone).  --readme writes into benchmarks/results/ instead and
regenerates the README's Performance block and benchmarks/RESULTS.md from the results there.
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
    from benchmarks.common import REPO, RESULTS, default_out
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None,
                    help="where the JSON and plots go (default: $PF_BENCH_DIR or /tmp/pf-bench; "
                         "with --readme: benchmarks/results)")
    ap.add_argument("--readme", action="store_true",
                    help="write into benchmarks/results and regenerate README.md's Performance "
                         "block and benchmarks/RESULTS.md")
    ap.add_argument("--no-peers", action="store_true", help="skip transformers / PEFT rows")
    ap.add_argument("--mixing-args", default="", help="extra flags for bench_mixing.py")
    ap.add_argument("--generate-args", default="", help="extra flags for bench_generate.py")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or (RESULTS if args.readme else os.path.dirname(default_out("x")))
    rel = os.path.relpath(out_dir) if os.path.abspath(out_dir).startswith(REPO) else out_dir

    from benchmarks import bench_generate, bench_mixing, report
    from benchmarks.report.common import load, plot_generate
    t0 = time.perf_counter()
    common = ["--device", args.device, "--threads", str(args.threads)]
    quick = ["--quick"] if args.quick else []
    plots = os.path.join(rel, "plots")
    bench_mixing.run(common + quick + ["--out", os.path.join(rel, "bench_mixing.json"),
                                       "--plots", plots] + shlex.split(args.mixing_args))
    gen = common + quick + ["--out", os.path.join(rel, "bench_generate.json")]
    if args.model:
        gen += ["--model", args.model]
    if args.no_peers:
        gen.append("--no-peers")
    bench_generate.run(gen + shlex.split(args.generate_args))
    plot_generate(load(os.path.join(out_dir, "bench_generate.json")),
                  os.path.join(out_dir, "plots", "generate_decode.png"))
    if args.readme:            # the commands that made the JSON are in the JSON itself
        cmd = shlex.join(["python", "-m", "benchmarks"] + list(sys.argv[1:] if argv is None else argv))
        report.write(out_dir, os.path.join(REPO, "README.md"),
                     os.path.join(REPO, "benchmarks", "RESULTS.md"), cmd)
    print(f"benchmarks: done in {time.perf_counter() - t0:.0f} s; results in {out_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
