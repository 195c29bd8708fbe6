"""Weights from disk: an HF-layout folder (safetensors, single file or sharded index) -> tensors.

Only safetensors are read: pickled checkpoints (``.bin``, ``.pt``, ``.pth``) can run arbitrary code
when loaded, so they are refused with a message saying how to convert them.  Every tensor the
config implies is checked for presence and shape before anything is returned; the first problem is
reported as one line naming the tensor and both shapes.

The layout returned is ours, not HF's: per layer the q, k, v projections are fused into one
``qkv`` weight [q_size + 2 kv_size, hidden] and gate/up into ``gate_up`` [2 intermediate, hidden],
so a decode step runs 4 GEMMs per layer instead of 7 (see mixing.Linear).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from pf_engine.model.config import HF_MODULE_NAMES, ModelConfig
from pf_engine.errors import LoadError
from pf_engine.model import quantize as q
from pf_engine.model.gguf_weights import GGUFSource

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass
class LayerWeights:
    """One decoder block. Shapes: qkv [q + 2 kv, d], o [d, q], gate_up [2 f, d], down [d, f]."""
    attn_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    """The projections, the embedding and the head are tensors or QuantWeights
    (model/qweight.py); norms and biases are tensors."""
    embed: torch.Tensor            # [vocab, d]
    layers: list[LayerWeights]
    norm: torch.Tensor             # [d]
    lm_head: torch.Tensor          # [vocab, d]; the same tensor as embed when tied


def refuse_pickle(path: str) -> None:
    raise LoadError(
        f"{path} is a pickled checkpoint, which pf_engine never loads (unpickling can run code); "
        "convert it to safetensors first, e.g. load it once in transformers and call "
        "save_pretrained(dir, safe_serialization=True)")


def find_weight_files(folder: str) -> list[str]:
    """The safetensors files of an HF folder: the sharded index's files, or model.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise LoadError(f"cannot read shard index {index}: {e}") from None
        files = [os.path.join(folder, s) for s in shards]
        for p in files:
            if not os.path.isfile(p):
                raise LoadError(f"shard {p} named in {index} does not exist")
        return files
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(folder, f) for f in others]
    pickled = sorted(f for f in os.listdir(folder) if f.endswith(PICKLE_SUFFIXES))
    if pickled:
        refuse_pickle(os.path.join(folder, pickled[0]))
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {folder}")


class _TensorSource:
    """Name -> tensor over several safetensors files, opened lazily, read once each."""

    def __init__(self, files: list[str]):
        from safetensors import safe_open
        self._handles, self._where = [], {}
        for p in files:
            try:
                h = safe_open(p, framework="pt")
                names = list(h.keys())
            except Exception as e:  # safetensors raises its own error types on corrupt headers
                raise LoadError(f"cannot read safetensors file {p}: {e}") from None
            self._handles.append((p, h))
            for n in names:
                self._where[n] = len(self._handles) - 1

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._where:
            raise LoadError(f"tensor {name} is missing from the checkpoint "
                            f"(expected shape {list(shape)})")
        path, h = self._handles[self._where[name]]
        try:
            t = h.get_tensor(name)
        except Exception as e:
            raise LoadError(f"cannot read tensor {name} from {path}: {e}") from None
        if tuple(t.shape) != tuple(shape):
            raise LoadError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        return t


def load_weights(folder: str, cfg: ModelConfig, dtype: torch.dtype, device,
                 quantize: str | None = None, gguf: str | None = None) -> ModelWeights:
    """Read, check and fuse every tensor of ``cfg``: from ``folder``'s safetensors, cast to
    ``dtype`` on ``device``, or, with ``gguf``, from that file with its 8/4-bit tensors kept as
    they are (model/gguf_weights.py).  ``quantize`` (model/quantize.py: q8, q4) quantizes the
    projections and the embedding of float weights at load."""
    if gguf is not None:
        src = GGUFSource(gguf, cfg)
    else:
        src = _TensorSource(find_weight_files(folder))
    recipe = q.recipe(quantize)

    def get(name, shape, kind="float"):
        t = src.get(name, shape)
        if not isinstance(t, torch.Tensor):          # a QuantWeight from the GGUF
            return t if kind != "float" else t.dequantize()
        t = t.to(device=device, dtype=dtype)
        return q.apply(recipe, t, kind, name)

    def proj(i, m, bias):
        stem = f"model.layers.{i}.{HF_MODULE_NAMES[m]}"
        w = get(stem + ".weight", cfg.module_shape(m), "proj")
        b = get(stem + ".bias", cfg.module_shape(m)[:1]) if bias else None
        return w, b

    def fuse(parts):
        ws, bs = zip(*parts)
        return q.cat(ws), (torch.cat(bs, 0) if bs[0] is not None else None)

    d = cfg.hidden_size
    layers = []
    for i in range(cfg.num_hidden_layers):
        qkv_b = cfg.attention_bias or cfg.qkv_bias
        qkv, qkv_bias = fuse([proj(i, m, qkv_b) for m in ("q", "k", "v")])
        o, o_bias = proj(i, "o", cfg.attention_bias)
        gate_up, gate_up_bias = fuse([proj(i, m, cfg.mlp_bias) for m in ("gate", "up")])
        down, down_bias = proj(i, "down", cfg.mlp_bias)
        layers.append(LayerWeights(
            attn_norm=get(f"model.layers.{i}.input_layernorm.weight", (d,)),
            qkv=qkv, qkv_bias=qkv_bias, o=o, o_bias=o_bias,
            mlp_norm=get(f"model.layers.{i}.post_attention_layernorm.weight", (d,)),
            gate_up=gate_up, gate_up_bias=gate_up_bias, down=down, down_bias=down_bias))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, d), "embed")
    if cfg.tie_word_embeddings:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight", (cfg.vocab_size, d), "embed")
    return ModelWeights(embed=embed, layers=layers, norm=get("model.norm.weight", (d,)),
                        lm_head=lm_head)


def check_model_path(path: str) -> str:
    """Validate a user-given model path; return the folder
    (refuse pickles, name what is missing)."""
    if not os.path.exists(path):
        raise LoadError(f"model path {path} does not exist")
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            refuse_pickle(path)
        raise LoadError(f"model path {path} is a file; "
                        "expected an HF-layout folder or a .gguf file")
    if not os.access(path, os.R_OK | os.X_OK):
        raise LoadError(f"model folder {path} is not readable")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoadError(f"no config.json in {path}; expected an HF-layout model folder")
    return path
