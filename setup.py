"""PersonaFuse Engine: persona-adaptive LLM inference with fused grouped-LoRA mixing.

The Triton kernels live in pf_kernels/ (the folder is the import name; never ``kernels``: that
name belongs to Hugging Face's package, which transformers probes).  The CUDA kernel in
csrc/cuda/ is compiled by nvcc when nvcc is found and PF_SKIP_CUDA_BUILD is unset (see
csrc/cuda/build.py); without nvcc the build warns and the engine falls back to the other backends.
The CPU kernel in csrc/cpu/ is compiled with the system C++ compiler unless PF_SKIP_CPU_BUILD
is set (csrc/cpu/build.py); a failed build warns and leaves the torch backend in place.
"""
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def build_cuda_extension() -> Path | None:
    """Compile csrc/cuda/ into pf_kernels/_pf_cuda*.so when nvcc is found; warn and skip otherwise.

    Never fails the install: set PF_SKIP_CUDA_BUILD=1 to skip on purpose.
    """
    if os.environ.get("PF_SKIP_CUDA_BUILD"):
        print("pf-engine: PF_SKIP_CUDA_BUILD is set: not building the CUDA kernel")
        return None
    try:
        spec = importlib.util.spec_from_file_location("pf_csrc_build",
                                                      HERE / "csrc" / "cuda" / "build.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        if builder.find_nvcc() is None:
            warnings.warn("pf-engine: nvcc not found: the CUDA kernel is not built "
                          "(the triton and torch backends still work)")
            return None
        return builder.build(quiet=True)
    except Exception as e:  # noqa: BLE001 - an optional build must never fail the install
        warnings.warn(f"pf-engine: the CUDA kernel failed to build and is skipped: {e}")
        return None


def build_cpu_extension() -> Path | None:
    """Compile csrc/cpu into pf_kernels/_pf_cpu*.so with the system C++ compiler (AVX2/FMA, its
    own thread pool); warn and skip when that fails.  Never fails the install: PF_SKIP_CPU_BUILD=1
    skips it."""
    if os.environ.get("PF_SKIP_CPU_BUILD"):
        print("pf-engine: PF_SKIP_CPU_BUILD is set: not building the CPU kernel")
        return None
    try:
        spec = importlib.util.spec_from_file_location("pf_cpu_build",
                                                      HERE / "csrc" / "cpu" / "build.py")
        builder = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(builder)
        return builder.build(quiet=True)
    except Exception as e:  # noqa: BLE001 - an optional build must never fail the install
        warnings.warn(f"pf-engine: the CPU kernel failed to build and is skipped (the torch "
                      f"backend still works): {e}")
        return None


class BuildPyWithCuda(build_py):
    """build_py that also builds the optional CUDA and CPU kernels into the pf_kernels package."""

    def run(self):
        built = [b for b in (build_cuda_extension(), build_cpu_extension()) if b is not None]
        super().run()
        if built and not getattr(self, "editable_mode", False):
            dest = Path(self.build_lib) / "pf_kernels"
            dest.mkdir(parents=True, exist_ok=True)
            for b in built:
                shutil.copy2(b, dest / b.name)


setup(
    name="pf-engine",
    version="0.1.0",
    description="Inference engine for persona-adaptive LLMs with per-token mixed LoRA experts",
    python_requires=">=3.10",
    packages=find_packages(include=["pf_engine", "pf_engine.*", "pf_kernels"]),
    package_data={"pf_engine.persona": ["banks/*.safetensors"]},
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "numpy",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "gguf>=0.10",
        "tqdm",
        "jinja2",
        "threadpoolctl",
        "peft",
        "fastapi",
        "uvicorn",
        "prometheus_client",
        "llguidance>=1.0",
    ],
    extras_require={
        "dev": ["pytest", "peft", "accelerate", "matplotlib", "triton", "pybind11", "openai",
                "httpx", "jsonschema", "lm-eval[api]>=0.4.5", "vaderSentiment==3.3.2",
                "ruff==0.17.6", "ray[serve]>=2.50"],
        # pf-serve --replicas: replicas on Ray Serve (serve/ray_serve.py)
        "ray": ["ray[serve]>=2.50"],
        # pf-eval's measures: lm-eval (reasoning), VADER (social-emotional; MIT)
        "eval": ["peft", "lm-eval[api]>=0.4.5", "vaderSentiment==3.3.2"],
    },
    entry_points={
        "console_scripts": [
            "pf-generate=pf_engine.cli.generate:main",
            "pf-convert=pf_engine.cli.convert:main",
            "pf-bank=pf_engine.cli.bank:main",
            "pf-train=pf_engine.cli.train:main",
            "pf-eval=pf_engine.cli.eval:main",
            "pf-serve=pf_engine.cli.serve:main",
        ],
    },
    cmdclass={"build_py": BuildPyWithCuda},
)
