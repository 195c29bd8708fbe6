"""PersonaFuse Engine: persona-adaptive LLM inference with fused grouped-LoRA mixing.

The Triton kernels live in kernels/ and install under the import name ``pf_kernels`` (never
``kernels``: that name belongs to Hugging Face's package, which transformers probes).  The CUDA
kernel in csrc/ is compiled by nvcc when nvcc is found and PF_SKIP_CUDA_BUILD is unset (see
csrc/build.py); without nvcc the build warns and the engine falls back to the other backends.
"""
from setuptools import setup

setup(
    name="pf-engine",
    version="0.1.0",
    description="Inference engine for persona-adaptive LLMs with per-token mixed LoRA experts",
    python_requires=">=3.10",
    packages=["pf_engine", "pf_engine.cli", "pf_kernels"],
    package_dir={"pf_kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "numpy",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "gguf>=0.10",
        "tqdm",
        "jinja2",
    ],
    extras_require={
        "dev": ["pytest", "peft", "accelerate", "matplotlib", "triton", "pybind11"],
    },
    entry_points={
        "console_scripts": [
            "pf-generate=pf_engine.cli.generate:main",
            "pf-convert=pf_engine.cli.convert:main",
            "pf-bank=pf_engine.cli.bank:main",
        ],
    },
)
