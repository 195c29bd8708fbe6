"""PEFT LoRA folders into an adapter bank: ``stack`` reads each folder (adapter_config.json and
adapter_model.safetensors as PEFT's ``save_pretrained`` writes them), checks it against the base
model and stacks the experts per (layer, module) as AdapterBank (bank.py) holds them.  An expert
that adapts a module only in some layers (``layers_to_transform``) gets zero blocks in the
others: its delta there is exactly zero (and a (layer, module) zero for every expert is then
dropped: bank.trim).
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from pf_engine.errors import LoadError
from pf_engine.model.config import HF_MODULE_NAMES, MODULES, ModelConfig
from pf_engine.persona.bank_file import fmt_shape

_HF_TO_SHORT = {hf.split(".")[-1]: m for m, hf in HF_MODULE_NAMES.items()}    # "q_proj" -> "q"
_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
                       r"\.lora_(A|B)(?:\.[^.]+)?\.weight$")


def stack(base_config: ModelConfig, experts: dict, dtype: torch.dtype | None = None) -> dict:
    """The AdapterBank constructor's arguments (but the names) for PEFT folders ``{expert name:
    folder}`` in this order; ``dtype``: the bank's (default: the adapters', float32 when they
    differ)."""
    read = [read_peft(n, os.fspath(d), base_config) for n, d in experts.items()]
    if dtype is None:
        dts = {t.dtype for _, _, _, w in read for ab in w.values() for t in ab}
        dtype = dts.pop() if len(dts) == 1 else torch.float32
    module_experts = {m: [k for k, (_, _, _, w) in enumerate(read)
                          if any(mm == m for (_, mm) in w)] for m in MODULES}
    weights = {}
    for m, ids in module_experts.items():
        if not ids:
            continue
        d_out, d_in = base_config.module_shape(m)
        for l in range(base_config.num_hidden_layers):
            a_parts, b_parts = [], []
            for k in ids:
                r = read[k][0]
                a, b = read[k][3].get((l, m), (torch.zeros(r, d_in), torch.zeros(d_out, r)))
                a_parts.append(a.to(dtype))
                b_parts.append(b.to(dtype))
            weights[(l, m)] = (torch.cat(a_parts, 0).contiguous(),
                               torch.cat(b_parts, 1).contiguous())
    return dict(ranks=[r for r, _, _, _ in read],
                scalings=[a / math.sqrt(r) if s else a / r for r, a, s, _ in read],
                fingerprint=base_config.fingerprint(), module_experts=module_experts,
                weights=weights, lora_alpha=[a for _, a, _, _ in read],
                use_rslora=[s for _, _, s, _ in read])


_SUPPORTED_TARGETS = ", ".join(f"{m}_proj" for m in _HF_TO_SHORT.values())


def read_peft(name: str, folder: str, config: ModelConfig):
    """One PEFT LoRA folder -> (r, lora_alpha, use_rslora, {(layer, module): (A, B)})."""
    where = f"expert {name!r} ({folder})"

    def fail(msg):
        raise LoadError(f"{where}: {msg}")

    if not os.path.isdir(folder):
        fail("no such folder")
    r, alpha, rslora = _read_config(folder, fail)
    return r, alpha, rslora, _read_weights(folder, r, config, fail)


def _read_config(folder: str, fail) -> tuple[int, float, bool]:
    """(r, lora_alpha, use_rslora) of the folder's adapter_config.json; anything the bank
    cannot hold exactly is refused through ``fail``."""
    cfg_path = os.path.join(folder, "adapter_config.json")
    if not os.path.isfile(cfg_path):
        fail("no adapter_config.json: not a PEFT adapter folder")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read adapter_config.json ({e})")
    if not isinstance(c, dict):
        fail("adapter_config.json is not a JSON object")
    ptype = str(c.get("peft_type", "")).upper()
    if ptype != "LORA":
        fail(f"peft_type is {c.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can join "
             "a bank")
    if c.get("use_dora"):
        fail("uses DoRA (use_dora=true), which is not supported; train a plain LoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            fail(f"{key} is not supported (per-module ranks or alphas): {c[key]!r}")
    if c.get("bias", "none") != "none":
        fail(f"bias={c['bias']!r} is not supported; only bias='none'")
    if c.get("lora_bias"):
        fail("lora_bias=true is not supported")
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters",
                "layer_replication", "alora_invocation_tokens"):
        if c.get(key):
            fail(f"{key} is not supported: {c[key]!r}")
    for key in ("fan_in_fan_out", "use_qalora", "use_bdlora"):
        if c.get(key):
            fail(f"{key}=true is not supported")
    targets = c.get("target_modules")
    if isinstance(targets, (list, tuple)):
        for t in targets:
            short = str(t).split(".")[-1]
            if short not in _HF_TO_SHORT:
                fail(f"targets {t!r}, which the engine cannot adapt; supported target modules: "
                     f"{_SUPPORTED_TARGETS}")
    try:
        r, alpha = c["r"], c["lora_alpha"]
    except KeyError as e:
        fail(f"adapter_config.json lacks {e}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        fail(f"bad rank r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        fail(f"bad lora_alpha={alpha!r}")
    return r, alpha, bool(c.get("use_rslora", False))


def _read_weights(folder: str, r: int, config: ModelConfig, fail) -> dict:
    """{(layer, module): (A [r, d_in], B [d_out, r])} of adapter_model.safetensors, every key
    and shape checked against the base model."""
    from safetensors.torch import load_file
    wpath = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(wpath):
        if any(os.path.isfile(os.path.join(folder, f)) for f in ("adapter_model.bin",
                                                                  "adapter_model.pt")):
            fail("has only adapter_model.bin (pickle, which the engine never loads); re-save it "
                 "as safetensors: PeftModel.from_pretrained(base, folder)"
                 ".save_pretrained(folder, safe_serialization=True)")
        fail("no adapter_model.safetensors")
    try:
        sd = load_file(wpath)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        fail(f"cannot read adapter_model.safetensors ({msg})")
    L = config.num_hidden_layers
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key in sorted(sd):
        mt = _PEFT_KEY.search(key)
        if mt is None:
            if "lora_magnitude_vector" in key:
                fail("uses DoRA (lora_magnitude_vector), which is not supported")
            if "lora_embedding" in key or "embed_tokens" in key:
                fail(f"adapts the token embeddings ({key}), which the engine cannot adapt")
            fail(f"tensor {key} adapts a module the engine cannot adapt; supported target "
                 f"modules: {_SUPPORTED_TARGETS}")
        l, m, ab = int(mt.group(1)), mt.group(2), mt.group(3)
        if l >= L:
            fail(f"tensor {key} is for layer {l}, but the base model has {L} layers")
        parts.setdefault((l, m), {})[ab] = sd[key]
    if not parts:
        fail("adapter_model.safetensors holds no LoRA weights")
    out = {}
    for (l, m), p in sorted(parts.items()):
        if set(p) != {"A", "B"}:
            fail(f"layer {l} {m}_proj has lora_{'A' if 'A' in p else 'B'} but not "
                 f"lora_{'B' if 'A' in p else 'A'}")
        d_out, d_in = config.module_shape(m)
        for ab, want in (("A", (r, d_in)), ("B", (d_out, r))):
            if tuple(p[ab].shape) != want:
                fail(f"layer {l} {m}_proj lora_{ab} has shape {fmt_shape(p[ab].shape)}, expected "
                     f"{fmt_shape(want)} (rank r={r}; the base model's {m} projection is "
                     f"d_out={d_out}, d_in={d_in})")
        out[(l, m)] = (p["A"], p["B"])
    return out
