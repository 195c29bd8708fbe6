"""Build the _pf_cuda extension (csrc/cuda/grouped_lora.cu + csrc/cuda/binding.cpp) with nvcc.

    python csrc/cuda/build.py [--out-dir DIR] [--arch 80 --arch 90] [--quiet]

Plain nvcc + pybind11, not torch's CUDAExtension (a CPU-only torch refuses to build one).  The
module lands in pf_kernels/ by default, i.e. it imports as ``pf_kernels._pf_cuda``.  The CUDA
runtime is linked statically, so the module needs only the driver at run time.  setup.py calls
:func:`build` when nvcc is found and PF_SKIP_CUDA_BUILD is unset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parent
DEFAULT_OUT = CSRC.parent.parent / "pf_kernels"
SOURCES = ("grouped_lora.cu", "binding.cpp")
DEFAULT_ARCHS = ("80", "90")
MODULE = "_pf_cuda"


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin; None when absent."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def output_path(out_dir: Path | str = DEFAULT_OUT) -> Path:
    return Path(out_dir) / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"


def nvcc_command(nvcc: str, out: Path, archs=DEFAULT_ARCHS) -> list[str]:
    import pybind11
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-cudart=static",
           "-Xcompiler", "-fPIC,-fvisibility=hidden", "--expt-relaxed-constexpr"]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    # PTX of the newest arch too, so GPUs newer than it JIT-compile the kernel instead of failing.
    top = max(archs, key=int)
    cmd += ["-gencode", f"arch=compute_{top},code=compute_{top}"]
    cmd += ["-I", str(CSRC), "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"]]
    cmd += [str(CSRC / s) for s in SOURCES]
    cmd += ["-o", str(out)]
    return cmd


def build(out_dir: Path | str = DEFAULT_OUT, archs=DEFAULT_ARCHS, quiet: bool = False) -> Path:
    """Compile the extension into ``out_dir``; returns the .so's path.  Raises RuntimeError."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (looked in $CUDA_HOME/bin, PATH, /usr/local/cuda/bin)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = output_path(out_dir)
    tmp = out.with_name(out.name + ".tmp")       # never leave a half-written module behind
    cmd = nvcc_command(nvcc, tmp, archs)
    if not quiet:
        print(" ".join(cmd), file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-20:]
        raise RuntimeError(f"nvcc failed with exit code {proc.returncode}:\n" + "\n".join(tail))
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT),
                    help="where the module goes (default: pf_kernels/)")
    ap.add_argument("--arch", action="append", help="SM version, repeatable (default: 80 and 90)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = build(args.out_dir, tuple(args.arch or DEFAULT_ARCHS), args.quiet)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
