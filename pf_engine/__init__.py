"""PersonaFuse Engine: serve LLMs whose LoRA persona experts are mixed per token."""
from pf_engine.errors import ConfigError, LoadError, PFError, RequestError

__version__ = "0.1.0"
__all__ = ["Engine", "SamplingParams", "PFError", "ConfigError", "LoadError", "RequestError",
           "__version__"]


def __getattr__(name):  # lazy: `import pf_engine` stays cheap for the CLIs' --help
    if name == "Engine":
        from pf_engine.engine import Engine
        return Engine
    if name == "SamplingParams":
        from pf_engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
