"""PersonaFuse Engine: serve LLMs whose LoRA persona experts are mixed per token."""
import os as _os

# torch's OpenMP workers spin for a while after each parallel region (libgomp's default: 300000
# rounds, tens of milliseconds here) before they sleep.  On a CPU box that spinning takes the
# cores from the engine's own kernel threads (csrc/cpu/pool.h): after every prefill the decode
# steps ran beside a spinning worker.  A short spin, read by libgomp when torch loads (so only
# if pf_engine is imported first, as the CLIs do), measured 1.4x faster prefill and ~10% faster
# decode on 2 cores (backends/threads.py).  A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")

from pf_engine.errors import ConfigError, LoadError, PFError, RequestError

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "PFError", "ConfigError", "LoadError", "RequestError",
           "__version__"]


def __getattr__(name):  # lazy: `import pf_engine` stays cheap for the CLIs' --help
    if name == "Engine":
        from pf_engine.engine import Engine
        return Engine
    if name == "SamplingParams":
        from pf_engine.generation.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
