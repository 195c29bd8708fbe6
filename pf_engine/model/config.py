"""Model configuration: one dataclass read from an HF ``config.json``.

Supported architectures are the Llama family: LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM.  All three share one decoder (RMSNorm, RoPE attention with GQA, SwiGLU MLP);
they differ only in the flags held here:

* Llama: optional ``rope_scaling`` of type "llama3", ``attention_bias``, ``mlp_bias``;
* Mistral: ``sliding_window`` (a key at position j is seen from position i iff i - window < j <= i);
* Qwen2: biases on q/k/v (never on o), sliding window only when ``use_sliding_window`` is set.

Both the transformers 4 layout (``rope_theta`` + ``rope_scaling``) and the transformers 5 layout
(``rope_parameters``) of config.json are read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from pf_engine.model.checks import (is_int, need_bool, need_dict, need_int, need_list, need_number,
                                    need_str)
from pf_engine.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The seven projections an adapter may target, in our short names, and their HF names.
MODULES = ("q", "k", "v", "o", "gate", "up", "down")
HF_MODULE_NAMES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


@dataclass
class ModelConfig:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False     # bias on q, k, v, o (Llama's flag)
    qkv_bias: bool = False           # bias on q, k, v only (Qwen2)
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                    f"{self.num_attention_heads} (and config.json gives no head_dim)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; expected 'silu'")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "llama3"):
                raise ConfigError(f"unsupported rope scaling {kind!r}; supported: default, llama3")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one projection, ``module`` in MODULES."""
        d, f = self.hidden_size, self.intermediate_size
        return {"q": (self.q_size, d), "k": (self.kv_size, d), "v": (self.kv_size, d),
                "o": (d, self.q_size), "gate": (f, d), "up": (f, d), "down": (d, f)}[module]

    def fingerprint(self) -> dict:
        """What an adapter bank records of its base model and checks at load."""
        return {"architecture": self.architecture, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers, "vocab_size": self.vocab_size}

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] in fp32 (llama3 scaling applied if asked)."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        rs = self.rope_scaling
        if rs is None or rs.get("rope_type", rs.get("type")) != "llama3":
            return inv
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)

    # I/O ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From config.json's fields, each checked by type and range (ConfigError naming it)."""
        need_dict(d, "config.json", err=ConfigError)

        def get(key, check, default=None, nullable=True, **kw):
            """d[key] checked; absent -> default; null -> default where config.json may say null."""
            v = d.get(key)
            if v is None and (nullable or key not in d):
                return default
            return check(v, f"config.json field {key}", err=ConfigError, **kw)

        def ids(key):
            v = d.get(key)
            if v is None or (is_int(v) and v >= 0):
                return v
            return need_list(v, f"config.json field {key}", lambda t: is_int(t) and t >= 0,
                             "token ids >= 0", err=ConfigError)

        archs = d.get("architectures") or []
        need_list(archs, "config.json field architectures", lambda a: isinstance(a, str), "names",
                  err=ConfigError)
        model_type = get("model_type", need_str)
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}.get(model_type, None)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        sizes = {}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if d.get(key) is None:
                raise ConfigError(f"config.json lacks {key}")
            sizes[key] = need_int(d[key], f"config.json field {key}", lo=1, err=ConfigError)
        rope = get("rope_parameters", need_dict, {})
        rope_theta = rope.get("rope_theta", d.get("rope_theta"))
        rope_theta = 10000.0 if rope_theta is None else need_number(
            rope_theta, "config.json field rope_theta", positive=True, err=ConfigError)
        scaling = get("rope_scaling", need_dict)
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
            for key in ("factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings"):
                need_number(scaling.get(key), f"config.json rope_scaling.{key}", positive=True,
                            err=ConfigError)
            if scaling["low_freq_factor"] == scaling["high_freq_factor"]:
                raise ConfigError("config.json rope_scaling: low_freq_factor equals "
                                  "high_freq_factor; expected two different factors")
        sliding = get("sliding_window", need_int, lo=1)
        if arch == "Qwen2ForCausalLM" and not get("use_sliding_window", need_bool, False):
            sliding = None
        return cls(
            architecture=arch, **sizes,
            num_key_value_heads=get("num_key_value_heads", need_int, lo=1),
            head_dim=get("head_dim", need_int, lo=1),
            rms_norm_eps=get("rms_norm_eps", need_number, 1e-6, nullable=False, positive=True),
            rope_theta=rope_theta, rope_scaling=scaling,
            max_position_embeddings=get("max_position_embeddings", need_int, 2048, nullable=False,
                                        lo=1),
            tie_word_embeddings=get("tie_word_embeddings", need_bool, False, nullable=False),
            attention_bias=(get("attention_bias", need_bool, False, nullable=False)
                            and arch != "Qwen2ForCausalLM"),
            qkv_bias=arch == "Qwen2ForCausalLM",
            mlp_bias=get("mlp_bias", need_bool, False, nullable=False),
            sliding_window=sliding, bos_token_id=ids("bos_token_id"),
            eos_token_id=ids("eos_token_id") or [],
            hidden_act=get("hidden_act", need_str, "silu", nullable=False),
        )

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {os.path.dirname(path) or '.'}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls.from_dict(d)


# Named presets; "tiny" is what CPU tests build random models from.
PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=[2]),
}
