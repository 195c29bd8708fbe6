"""Build the _pf_cpu extension (csrc/cpu/*.cpp) with the system C++ compiler.

    python csrc/cpu/build.py [--out-dir DIR] [--quiet]

Plain c++ + pybind11 + OpenMP, AVX2/FMA code (the module checks the CPU before it is imported:
pf_kernels.cpu_ops).  The module lands in pf_kernels/ by default, i.e. it imports as
``pf_kernels._pf_cpu``.  setup.py calls :func:`build` on every install unless PF_SKIP_CPU_BUILD
is set; a failed build warns and leaves the torch backend in place.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent.parent / "pf_kernels"
SOURCES = [HERE / "grouped_lora_cpu.cpp", HERE / "decode_attention.cpp"]   # the first binds all
MODULE = "_pf_cpu"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
         "-fvisibility=hidden"]


def find_cxx() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def build(out_dir: Path | str = DEFAULT_OUT, quiet: bool = False) -> Path:
    """Compile the module into out_dir; returns its path (raises RuntimeError on failure)."""
    import pybind11
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    out = Path(out_dir) / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, *FLAGS, f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           *map(str, SOURCES), "-o", str(out)]
    if not quiet:
        print(" ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{Path(cxx).name} failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = build(args.out_dir, args.quiet)
    except RuntimeError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
