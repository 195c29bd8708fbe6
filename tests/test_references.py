"""Every source file a docstring or comment names exists: a path such as ``runtime/runner.py``
or ``csrc/cpu/pool.h`` in pf_engine, pf_kernels, csrc, benchmarks, tests or the
README resolves against the naming file's folder or one of its parents (up to the repository
root), or against one of ROOTS.  A module moved or deleted leaves no text pointing
at it.  In C++ only comments and quoted includes are read (a member access there is code);
benchmarks/RESULTS.md is generated from results that name the files of their own commit."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("pf_engine", "pf_kernels", "csrc", "benchmarks", "tests", "README.md", "setup.py")
SOURCE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.(?:py|h|cpp|cu|cuh))(?![\w/])")
# names that are not this repository's files: other projects', or written by a test or tool
ELSEWHERE = {"llama.cpp", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "kernel_utils.py",
             "rank0.py", "meta.py", "noguard.py"}
SKIPPED = ("benchmarks/RESULTS.md",)
ROOTS = ("pf_engine", "benchmarks", "csrc/cpu", "csrc/cuda", "data/evals")   # named from anywhere
CPP = (".h", ".cpp", ".cu", ".cuh")


def readable(line: str, path: str) -> str:
    """The part of a line whose file names count: a C++ line's comment or quoted include."""
    if not path.endswith(CPP):
        return line
    include = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
    if include:
        return include.group(1)
    return line.split("//", 1)[1] if "//" in line else (line if line.lstrip().startswith("*") else "")


def files():
    for entry in SCANNED:
        path = os.path.join(ROOT, entry)
        if os.path.isfile(path):
            yield path
            continue
        for folder, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "build", "results", "data")]
            for n in names:
                full = os.path.join(folder, n)
                if n.endswith((".py", ".md") + CPP) and os.path.relpath(full, ROOT) not in SKIPPED:
                    yield full


def resolves(name: str, source: str) -> bool:
    if os.path.basename(name) in ELSEWHERE or name.endswith("/llama.cpp"):
        return True
    folder = os.path.dirname(source)
    while True:
        if os.path.exists(os.path.join(folder, name)):
            return True
        if folder == ROOT or len(folder) < len(ROOT):
            break
        folder = os.path.dirname(folder)
    return any(os.path.exists(os.path.join(ROOT, top, name)) for top in ROOTS)


def stale() -> list[str]:
    out = []
    for path in files():
        for i, line in enumerate(open(path, encoding="utf-8"), 1):
            for name in SOURCE.findall(readable(line, path)):
                if not resolves(name, path):
                    out.append(f"{os.path.relpath(path, ROOT)}:{i}: {name}")
    return out


def test_every_named_source_file_exists():
    bad = stale()
    assert not bad, "names of files that do not exist:\n" + "\n".join(bad)
