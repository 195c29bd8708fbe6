"""llama.cpp (llama-cpp-python) as the CPU peer: the same weights and LoRAs converted with its own
scripts, timed the way bench_cpu times pf_engine.

llama-cpp-python is never a dependency and never built in CI.  Build it once, outside the repo
(about 20-40 minutes on 2 cores), for the baseline instructions our kernel uses:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-deps llama_cpp_python-0.3.36.tar.gz diskcache
    tar xzf llama_cpp_python-0.3.36.tar.gz        # its vendor/llama.cpp has the converters
    pip install sentencepiece                     # they need it

and pass ``--llama-src .../vendor/llama.cpp`` (the folder holding convert_hf_to_gguf.py) to
bench_cpu.  Conversions are cached beside the other bench_cpu files.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import sys
import time


def available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, f"llama_cpp is not importable ({e})"
    return True, ""


def _convert(script: str, args: list[str], out: str, llama_src: str) -> str:
    if os.path.isfile(out):
        return out
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(llama_src, "gguf-py"), llama_src]))
    tmp = out + ".part"
    r = subprocess.run([sys.executable, os.path.join(llama_src, script), *args, "--outfile", tmp],
                       env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{script} failed: {r.stderr.strip()[-500:]}")
    os.replace(tmp, out)
    return out


def convert_model(hf_folder: str, outtype: str, out: str, llama_src: str) -> str:
    """llama.cpp's convert_hf_to_gguf.py on an HF folder (outtype f32 / q8_0 / ...)."""
    return _convert("convert_hf_to_gguf.py", [hf_folder, "--outtype", outtype], out, llama_src)


def convert_lora(peft_dir: str, hf_folder: str, out: str, llama_src: str) -> str:
    """llama.cpp's convert_lora_to_gguf.py on a PEFT LoRA folder (fp32)."""
    return _convert("convert_lora_to_gguf.py", [peft_dir, "--base", hf_folder, "--outtype", "f32"],
                    out, llama_src)


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def _plain_buffers(on: bool):
    """With ``on``, models load without llama.cpp's extra buffer types (use_extra_bufts = false).
    On a CPU with AMX llama.cpp puts the block-quantized weights in its AMX buffer type, and a
    decode on them crashes (segmentation fault in llama_decode at q8_0, q4_1 and q4_k_m, with or
    without LoRA adapters; llama-cpp-python 0.3.36 built with GGML_NATIVE on an Intel Xeon with
    AMX-INT8; f32, f16 and bf16 run).  There its rows run its AVX-512 kernels instead; elsewhere
    the extra buffer types (its weight repacking) stay on.  LlamaRunner.plain records which."""
    import llama_cpp.llama_cpp as low
    if not on or not hasattr(low.llama_model_params, "use_extra_bufts"):
        yield
        return
    default = low.llama_model_default_params

    def plain():
        p = default()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = plain
    try:
        yield
    finally:
        low.llama_model_default_params = default


class LlamaRunner:
    """One llama.cpp model at ``threads`` threads, with LoRAs applied at ``scales``."""

    def __init__(self, gguf: str, threads: int, n_ctx: int = 1024, loras=(), scales=(),
                 logits_all: bool = False, n_batch: int = 512):
        import llama_cpp
        self.lib = llama_cpp
        self.plain = cpu_has_amx()
        with _plain_buffers(self.plain):
            self.llm = llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads,
                                       n_ctx=n_ctx, n_batch=n_batch, verbose=False,
                                       logits_all=logits_all)
        self._adapters = []
        if loras:
            for path in loras:
                a = llama_cpp.llama_adapter_lora_init(self.llm.model, path.encode())
                if not a:
                    raise RuntimeError(f"llama.cpp could not load the LoRA {path}")
                self._adapters.append(a)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * len(self._adapters))(*self._adapters)
            sc = (ctypes.c_float * len(scales))(*scales)
            if llama_cpp.llama_set_adapters_lora(self.llm.ctx, arr, len(self._adapters), sc) != 0:
                raise RuntimeError("llama_set_adapters_lora failed")

    def timed(self, ids: list[int], n: int) -> tuple[float, float, list[int]]:
        """(prefill seconds, decode seconds per token, the greedy tokens) for n new tokens, EOS
        ignored: the prompt in one eval, then n - 1 single-token evals."""
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        prefill = time.perf_counter() - t
        out = [self._argmax()]
        t = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(self._argmax())
        return prefill, (time.perf_counter() - t) / max(1, n - 1), out

    def _argmax(self) -> int:
        """The greedy token of the last eval.  Read from llama_get_logits: without logits_all,
        llama-cpp-python 0.3.36 leaves ``scores`` zero (an earlier bench_cpu run's llama.cpp rows
        fed token 0 back; the same forward work per token, so their timings stand)."""
        import numpy as np
        ptr = self.lib.llama_get_logits(self.llm.ctx)
        return int(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).argmax())

    def nll(self, ids: list[int], first: int = 0) -> tuple[float, int]:
        """(sum of -log p(ids[t] | ids[:t]) over t in first + 1 .. len(ids) - 1, count) in one
        pass (logits_all): first = 0 scores every token after the first."""
        self.eval_all(ids)
        return self.scored_nll(ids, first)

    def eval_all(self, ids: list[int]) -> float:
        """Evaluate ids from an empty cache, every position's logits kept (logits_all); the
        seconds it took."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def scored_nll(self, ids: list[int], first: int = 0) -> tuple[float, int]:
        """``nll`` from the logits of the last ``eval_all(ids)`` (log-softmax in float64)."""
        import numpy as np
        logits = np.asarray(self.llm.scores[first:len(ids) - 1], dtype=np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        lp = logits[np.arange(len(logits)), ids[first + 1:]] - lse
        return float(-lp.sum()), len(ids) - 1 - first
