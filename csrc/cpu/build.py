"""Build the _pf_cpu extension (csrc/cpu/*.cpp) with the system C++ compiler.

    python csrc/cpu/build.py [--out-dir DIR] [--clean] [--quiet]

Plain c++ + pybind11, AVX2/FMA code for any x86-64 CPU that has them (never -march=native; the
module checks the CPU before it is imported: pf_kernels.cpu_ops).  Each source compiles to its own
object, os.cpu_count() at a time, kept in csrc/build/cpu/ and rebuilt only when it is older than
its source, a header of csrc/cpu or this file (--clean rebuilds all):

    SOURCES          the typed API (LinearPlan, BlockPlan, decode_attention) on its own thread
                     pool (pool.cpp): no OpenMP
    VARIANT_SOURCE   quant_dots.cpp once per entry of ISAS that the compiler accepts (isa.h), with
                     -DPF_ISA=<name> and its flags; isa.cpp learns which through -DPF_HAVE_<NAME>
                     and picks one at run time.  Each variant's object must define symbols only
                     in its namespace pf_cpu::<name> (checked with nm): a shared inline function
                     compiled with AVX-512 would otherwise reach baseline callers.

The module lands in pf_kernels/ by default, i.e. it imports as ``pf_kernels._pf_cpu``.  setup.py
calls :func:`build` on every install unless PF_SKIP_CPU_BUILD is set; a failed build warns and
leaves the torch backend in place.
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
OBJ_DIR = HERE.parent / "build" / "cpu"
SOURCES = [HERE / n for n in ("binding.cpp", "binding_linear.cpp", "binding_attention.cpp",
                               "binding_block.cpp", "binding_quant.cpp", "check.cpp",
                               "linear_plan.cpp", "linear_x.cpp", "attention.cpp", "block_plan.cpp",
                               "pool.cpp", "isa.cpp", "shm_group.cpp", "binding_group.cpp")]
VARIANT_SOURCE = HERE / "quant_dots.cpp"
MODULE = "_pf_cpu"
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-std=c++17", "-fvisibility=hidden",
         "-pthread", "-Wall"]
# isa.h's variants: name -> flags beyond FLAGS (avx2, the baseline, is always built)
ISAS = {
    "avx2": [],
    "avxvnni": ["-mavxvnni"],
    # gcc 12's own AVX-512F intrinsics header trips -Wuninitialized
    # on its _mm512_undefined_* operands
    # (GCC bug 105593, fixed in 13): silenced for this unit only.
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-Wno-uninitialized",
                   "-Wno-maybe-uninitialized"],
}
# amx: avx512vnni's code, amx.h's tiles for prefill, amx_bf16.h's for a bf16 W
ISAS["amx"] = [*ISAS["avx512vnni"], "-mamx-tile", "-mamx-int8", "-mamx-bf16"]
LINK_FLAGS = ["-shared", "-pthread"]


def find_cxx() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def build(out_dir: Path | str = DEFAULT_OUT, quiet: bool = False, clean: bool = False) -> Path:
    """Compile the module into out_dir; returns its path (raises RuntimeError on failure)."""
    import pybind11
    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    out = Path(out_dir) / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    inc = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    OBJ_DIR.mkdir(parents=True, exist_ok=True)
    deps = max(p.stat().st_mtime for p in [Path(__file__), *HERE.glob("*.h")])
    isas = [n for n in ISAS if n == "avx2" or _accepts(cxx, ISAS[n])]
    have = [f"-DPF_HAVE_{n.upper()}" for n in isas if n != "avx2"]
    units = [(src, src.stem, [*FLAGS, *(have if src.name == "isa.cpp" else [])]) for src in SOURCES]
    units += [(VARIANT_SOURCE, f"{VARIANT_SOURCE.stem}_{n}", [*FLAGS, *ISAS[n], f"-DPF_ISA={n}"])
              for n in isas]
    objs, stale = [], []
    for src, stem, flags in units:       # the variants last: the linker keeps first copies
        obj = OBJ_DIR / (stem + ".o")
        objs.append(obj)
        if clean or not obj.exists() or obj.stat().st_mtime < max(deps, src.stat().st_mtime):
            stale.append((src, [cxx, *flags, *inc, "-c", str(src), "-o", str(obj)]))
    _run(stale, quiet)
    for n in isas:
        _check_namespace(OBJ_DIR / f"{VARIANT_SOURCE.stem}_{n}.o", n)
    _run([(out, [cxx, *LINK_FLAGS, *map(str, objs), "-o", str(out)])], quiet)
    return out


def _accepts(cxx: str, flags: list[str]) -> bool:
    """Whether the compiler takes these -m flags (an old one lacks -mavxvnni)."""
    p = subprocess.run([cxx, *flags, "-x", "c++", "-fsyntax-only", "-"], input="", text=True,
                       capture_output=True)
    return p.returncode == 0


def _check_namespace(obj: Path, isa: str) -> None:
    """RuntimeError unless every symbol obj defines for the linker is in pf_cpu::<isa>::."""
    nm = shutil.which("nm")
    if nm is None:
        return
    p = subprocess.run([nm, "-C", "--defined-only", "--extern-only", str(obj)], text=True,
                       capture_output=True)
    bad = [line for line in p.stdout.splitlines()
           if line.strip() and f"pf_cpu::{isa}::" not in line.split(" ", 2)[-1]]
    if p.returncode != 0 or bad:
        raise RuntimeError(f"{obj.name} defines symbols outside pf_cpu::{isa}:: "
                           f"({'; '.join(bad[:5]) or p.stderr.strip()})")


def _run(jobs: list[tuple[Path, list[str]]], quiet: bool) -> None:
    """Runs (what, command) jobs os.cpu_count() at a time; RuntimeError naming every failure."""
    width = max(1, os.cpu_count() or 1)
    failed = []
    for i in range(0, len(jobs), width):
        procs = []
        for what, cmd in jobs[i:i + width]:
            if not quiet:
                print(" ".join(cmd))
            procs.append((what, cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                      stderr=subprocess.PIPE, text=True)))
        for what, cmd, p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                Path(cmd[-1]).unlink(missing_ok=True)
                failed.append(f"{Path(cmd[0]).name} failed on {what.name} (exit {p.returncode}): "
                              f"{err.strip()[-2000:]}")
            elif err.strip() and not quiet:
                print(err.strip(), file=sys.stderr)
    if failed:
        raise RuntimeError("\n".join(failed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT))
    ap.add_argument("--clean", action="store_true", help="rebuild every object")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        path = build(args.out_dir, args.quiet, args.clean)
    except RuntimeError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
