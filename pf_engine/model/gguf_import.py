"""GGUF -> HF-layout folder (config.json, model.safetensors in fp32, tokenizer files).

The Llama (Mistral GGUFs also say "llama") and Qwen2 architectures are imported.
Tensors are dequantised
with the ``gguf`` package and streamed one by one into the safetensors file, so memory stays at one
tensor whatever the model's size.

llama.cpp stores Q and K with the rotary pairs interleaved
(its rope rotates (x0, x1), (x2, x3), ...)
where HF rotates halves (x_i, x_{i+D/2}).  Its converter permuted each head's rows

    w.reshape(H, 2, D/2, d_in).swapaxes(1, 2).reshape(H*D, d_in)      # HF -> GGUF

so the import does the inverse, per head of D = rows / H rows (H = KV heads for K):

    w.reshape(H, D/2, 2, d_in).swapaxes(1, 2).reshape(H*D, d_in)      # GGUF -> HF

Only Llama's converter permutes (``permutes_qk``): Qwen2's rope in llama.cpp rotates halves (NEOX
mode), as HF does, so its Q and K rows are stored in HF's order.

Everything is written into a hidden sibling folder that is renamed into place at the end: a failed
or interrupted conversion leaves nothing behind and never touches an existing folder.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import struct
import tempfile
import time

import numpy as np

from pf_engine.errors import ConfigError, LoadError, PFError

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")
# architecture -> (HF architectures[0], model_type)
_HF_ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def permutes_qk(architecture: str) -> bool:
    """Whether llama.cpp's converter permuted the Q and K rows of a model of this HF architecture
    (the module docstring)."""
    return architecture == "LlamaForCausalLM"


# Written last into every converted folder: what it came from; its presence marks a whole folder.
MARKER = "pf_convert.json"
CONVERTER_VERSION = 1

# GGUF tensor name (after "blk.{i}.") -> HF name (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


# Reading ------------------------------------------------------------------------------------------
def _open_reader(path: str):
    """A gguf.GGUFReader over ``path``, every failure turned into one LoadError line."""
    import gguf

    if not os.path.exists(path):
        raise LoadError(f"no such file: {path}")
    if os.path.isdir(path):
        raise LoadError(f"{path} is a directory; expected a .gguf file")
    if not os.access(path, os.R_OK):
        raise LoadError(f"cannot read {path}: permission denied")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror or e}") from None
    if not magic:
        raise LoadError(f"{path} is empty; expected a GGUF file")
    if magic != b"GGUF":
        raise LoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, TypeError, struct.error, OSError, OverflowError,
            MemoryError) as e:
        raise LoadError(f"{path} is not a readable GGUF file (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from None
    size = reader.data.size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LoadError(f"{path} is truncated: tensor {t.name} ends at byte "
                            f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF one; None for the ones the import consumes (rope_freqs)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ConfigError(f"GGUF tensor {gguf_name!r} has no place in a Llama model "
                          f"(mixture-of-experts and other variants are not supported)")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _torch_shape(t) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml's ne order is reversed


def _dequantize(t, path: str) -> np.ndarray:
    """One tensor as a C-contiguous fp32 array in torch order."""
    import gguf

    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise LoadError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, "
                        "which the gguf "
                        f"package cannot dequantise") from None
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(_torch_shape(t))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rope permutation of Q or K rows (see the module docstring)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


# Config -------------------------------------------------------------------------------------------
def _llama3_factors(factor, lo, hi, old, theta, head_dim) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for llama3 scaling (convert_hf_to_gguf.py, LlamaModel)."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    out = np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, factor, 0.0))
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    out[mid] = 1.0 / ((1 - smooth[mid]) / factor + smooth[mid])
    return out


def _rope_scaling(reader, arch: str, theta: float, head_dim: int, path: str) -> dict | None:
    kind = _meta(reader, f"{arch}.rope.scaling.type")
    factor = (_meta(reader, f"{arch}.rope.scaling.factor")
              or _meta(reader, f"{arch}.rope.scale_linear"))
    orig = _meta(reader, f"{arch}.rope.scaling.original_context_length")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        # Llama 3.1+: llama.cpp keeps only the per-frequency factors; recover the HF parameters.
        got = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
        f = float(got.max())
        for old in dict.fromkeys([int(orig or 8192), 8192]):
            for lo, hi in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
                want = _llama3_factors(f, lo, hi, old, theta, head_dim)
                if want.shape == got.shape and np.allclose(want, got, rtol=1e-4, atol=1e-5):
                    return {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                            "high_freq_factor": hi, "original_max_position_embeddings": old}
        raise ConfigError(f"{path}: rope_freqs.weight does not match llama3 rope scaling "
                          f"(factor {f:g}); cannot express it in config.json")
    if kind in (None, "", "none") and not factor:
        return None
    if kind in (None, "", "linear", "yarn"):
        if kind != "yarn" and float(factor) == 1.0:
            return None
        # The runtime implements default and llama3 rope only: refuse here, before anything is
        # written, rather than convert a model that cannot load.
        raise ConfigError(f"{path}: rope scaling {kind or 'linear'!r} "
                          f"(factor {float(factor or 1):g}) "
                          "is not supported by the engine; supported: none, llama3")
    if kind == "llama3":
        return {"rope_type": "llama3", "factor": float(factor or 8.0), "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": int(orig or 8192)}
    raise ConfigError(f"{path}: unsupported rope scaling type {kind!r}; "
                      f"supported: none, linear, yarn, llama3")


def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from
    (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _build_config(reader, path: str) -> dict:
    arch = _meta(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ConfigError(f"{path}: unsupported GGUF architecture {arch!r}; "
                          f"supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    if (_meta(reader, f"{arch}.expert_count") or 0) > 0:
        raise ConfigError(f"{path}: mixture-of-experts GGUFs are not supported")
    names = {t.name: t for t in reader.tensors}
    for required in ("token_embd.weight", "output_norm.weight"):
        if required not in names:
            raise LoadError(f"{path}: missing tensor {required}")

    def need(key):
        v = _meta(reader, f"{arch}.{key}")
        if v is None:
            raise LoadError(f"{path}: missing metadata {arch}.{key}")
        return v

    hidden = int(need("embedding_length"))
    n_layers = int(need("block_count"))
    n_heads = int(need("attention.head_count"))
    n_kv = int(_meta(reader, f"{arch}.attention.head_count_kv") or n_heads)
    head_dim = int(_meta(reader, f"{arch}.attention.key_length")
                   or _meta(reader, f"{arch}.rope.dimension_count") or hidden // n_heads)
    theta = _f32(_meta(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab = int(_meta(reader, f"{arch}.vocab_size") or _torch_shape(names["token_embd.weight"])[0])
    tied = "output.weight" not in names
    cfg = {
        "architectures": [_HF_ARCH[arch][0]],
        "model_type": _HF_ARCH[arch][1],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, theta, head_dim, path),
        "max_position_embeddings": int(_meta(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": tied,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_up.bias" in names,
        "torch_dtype": "float32",
    }
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        v = _meta(reader, f"tokenizer.ggml.{name}")
        if v is not None:
            cfg[key] = int(v)
    return cfg


# Writing ------------------------------------------------------------------------------------------
def _write_safetensors(reader, cfg: dict, path: str, out_file: str,
                       progress: bool) -> tuple[int, int]:
    """Stream every tensor, dequantised to fp32 in HF order, into ``out_file``: (count, bytes)."""
    from tqdm.auto import tqdm

    plan = []  # (hf_name, reader tensor, torch shape)
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is not None:
            plan.append((name, t, _torch_shape(t)))
    plan.sort(key=lambda p: _sort_key(p[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, shape in plan:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
    heads = ({"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
             if permutes_qk(cfg["architectures"][0]) else {})
    with open(out_file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, t, shape in tqdm(plan, desc="dequantising", unit="tensor", disable=not progress):
            arr = _dequantize(t, path)
            proj = name.split(".")[-2]
            if proj in heads:
                arr = _unpermute(arr, heads[proj])
            f.write(memoryview(arr).cast("B"))
    return len(plan), offset


def _sort_key(name: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    return (1, int(m.group(1)), m.group(2)) if m else ((0 if "embed" in name else 2), 0, name)


def _write_tokenizer(path: str, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja."""
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".",
                                                gguf_file=os.path.basename(path))
        finally:
            hf_logging.set_verbosity(verbosity)
        tok.save_pretrained(out_dir)
    except PFError:
        raise
    except Exception as e:  # transformers raises many kinds on an odd vocabulary
        raise LoadError(f"{path}: cannot build its tokenizer: {type(e).__name__}: {e}") from None
    # Also put the template (and no loader-specific keys) in tokenizer_config.json, so that a
    # reader of that file alone (tokenizers + jinja2) finds it too.
    cfg_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_file, encoding="utf-8") as f:
        tcfg = json.load(f)
    for key in ("is_local", "local_files_only"):
        tcfg.pop(key, None)
    if tok.chat_template and "chat_template" not in tcfg:
        tcfg["chat_template"] = tok.chat_template
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(tcfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _write_json(obj: dict, file: str) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_folder(gguf_path: str, out_dir: str, *, progress: bool = True) -> dict:
    """Convert into ``out_dir`` (an existing, empty folder), the marker file last;
    return the marker.

    The building block of ``convert_gguf`` and of the bundled model's cache: no safety here.
    """
    t0 = time.perf_counter()
    reader = _open_reader(gguf_path)
    cfg = _build_config(reader, gguf_path)
    n, nbytes = _write_safetensors(reader, cfg, gguf_path,
                                   os.path.join(out_dir, "model.safetensors"),
                                   progress)
    _write_json(cfg, os.path.join(out_dir, "config.json"))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    _write_json(gen, os.path.join(out_dir, "generation_config.json"))
    _write_tokenizer(gguf_path, out_dir)
    marker = {"converter_version": CONVERTER_VERSION, "source": os.path.basename(gguf_path),
              "source_bytes": os.path.getsize(gguf_path), "tensors": n, "bytes": nbytes,
              "seconds": round(time.perf_counter() - t0, 2)}
    _write_json(marker, os.path.join(out_dir, MARKER))
    return marker


# Safe placement -----------------------------------------------------------------------------------
def make_temp_sibling(out_dir: str) -> str:
    """A fresh hidden folder next to ``out_dir`` (same filesystem, so a rename moves it)."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        while True:  # os.mkdir, not mkdtemp: the folder gets the umask's mode, not 0700
            tmp = os.path.join(parent, f".{base}.partial-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                os.mkdir(tmp)
                return tmp
            except FileExistsError:
                continue
    except OSError as e:
        raise PFError(f"cannot create a folder next to {out_dir}: {e.strerror or e}") from None


def _is_nonempty(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def install_folder(tmp: str, out_dir: str, *, overwrite: bool) -> None:
    """Rename the complete folder ``tmp`` to ``out_dir``; with ``overwrite`` the old one goes only
    after the new one is in place.  Raises FileExistsError if a non-empty ``out_dir`` is in the way
    and ``overwrite`` is False."""
    try:
        os.rename(tmp, out_dir)  # atomic; replaces an empty folder, refuses a non-empty one
        return
    except OSError:
        if os.path.isdir(out_dir) and _is_nonempty(out_dir) and not overwrite:
            raise FileExistsError(out_dir) from None
        if not os.path.lexists(out_dir):
            raise
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                           dir=os.path.dirname(out_dir))
    old = os.path.join(old, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)  # put the old folder back
        raise
    finally:
        shutil.rmtree(os.path.dirname(old), ignore_errors=True)


def convert_gguf(gguf_path, out_dir, *, overwrite: bool = False, progress: bool = True) -> str:
    """Convert a Llama GGUF into an HF-layout folder; return the folder's absolute path.

    Writes config.json, model.safetensors (fp32, HF names), generation_config.json, the tokenizer
    files (tokenizer.json, tokenizer_config.json, chat_template.jinja) and pf_convert.json.
    A non-empty ``out_dir`` is refused unless ``overwrite``.  Errors: LoadError for a missing,
    unreadable or corrupt file, ConfigError for an architecture that is not Llama.
    """
    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise PFError(f"output path {out_dir} exists and is not a folder")
    if _is_nonempty(out_dir) and not overwrite:
        raise PFError(f"output folder {out_dir} is not empty; pass --overwrite "
                      f"(overwrite=True) to replace it")
    if not os.path.isfile(gguf_path):  # fail before creating anything
        _open_reader(gguf_path)
    tmp = make_temp_sibling(out_dir)
    try:
        write_folder(gguf_path, tmp, progress=progress)
        try:
            install_folder(tmp, out_dir, overwrite=overwrite)
        except FileExistsError:
            raise PFError(f"output folder {out_dir} was filled during the conversion; pass "
                          f"--overwrite (overwrite=True) to replace it") from None
        except OSError as e:
            raise PFError(f"cannot move the converted model to {out_dir}: "
                          f"{e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def read_marker(folder: str) -> dict | None:
    """The pf_convert.json of a complete converted folder, or None."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
