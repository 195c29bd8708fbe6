"""Training against the weights the engine serves (pf-train --quantize): QLoRA's idea,
in our formats.

On the CPU, the engine computes each projection as ``y = W_s . x_s``: W_s is the weight as served
(a GGUF's 8/4-bit or 16-bit tensors kept as stored, or an HF folder's floats quantized at load by
``quantize``: model/quantize.py), and for a block-quantized W_s the activations are rounded per
block of 32 values to int8 first (csrc/cpu/quant.h's quantize_x):

    x_s = round8(x):  per block b of 32 values, d_b = max|x_b| / 127,
                      x_s[i] = d_b * round(x[i] * 127 / max|x_b|)   (ties away from zero)

``serve_like(hf, cfg, weights)`` makes a transformers model compute the same thing:
  * every projection, the embedding and the head get W_s's values (dequantized exactly: the
    numbers the kernels multiply), so the frozen base is the served one;
  * every projection (and the head) whose W_s is block-quantized rounds its input with round8 in
    the forward pass and passes the gradient straight through (x + (round8(x) - x).detach()),
    so adapters learn under the rounding they will be served with.
The hook sits on the base projection, so the LoRA path peft adds beside it reads x unrounded
(served 8-bit experts read x_s: a difference of the rounding's size in a term of the adapter's).

    folder, cfg, weights = served_weights(None, None)    # the bundled model as served: Q4_1
    hf = load_hf_model(folder); serve_like(hf, cfg, weights)
"""
from __future__ import annotations

import torch

from pf_engine.model.config import HF_MODULE_NAMES
from pf_engine.model.qweight import QuantWeight

QK = 32
PROJECTIONS = ((("q", "k", "v"), "qkv"), (("o",), "o"), (("gate", "up"), "gate_up"),
               (("down",), "down"))


def round8(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] (d a multiple of 32) -> the values the kernels' int8 activations stand for."""
    xb = x.reshape(*x.shape[:-1], -1, QK)
    mx = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(mx > 0, 127.0 / torch.where(mx > 0, mx, torch.ones_like(mx)),
                      torch.zeros_like(mx))
    s = xb * inv
    q = torch.trunc(s + torch.copysign(torch.full_like(s, 0.5), s))
    return (q * (mx / 127.0)).reshape(x.shape)


def _round_input(module, args):
    x = args[0]
    return (x + (round8(x.detach()) - x).detach(),) + tuple(args[1:])


def served_weights(model, quantize: str | None, progress: bool = False):
    """(folder, ModelConfig, ModelWeights) of ``model`` (None: the bundled one; an HF folder; a
    .gguf) as Engine.from_pretrained(model, quantize=quantize) serves it on the CPU.  (On a GPU
    the engine serves the model's float weights at its dtype: what transformers loads from the
    same folder, so pf-train --device cuda needs no serve_like.)"""
    import os

    from pf_engine.backends import resolve_backend
    from pf_engine.engine import gguf_source, resolve_model, served_load_args
    from pf_engine.model import quantize as quantization
    from pf_engine.model.config import ModelConfig
    from pf_engine.model.loading import load_weights
    dev, dt = torch.device("cpu"), torch.float32
    gguf = gguf_source(model)
    backend = resolve_backend(None, dev, None)
    mode = quantization.check(quantize, gguf=gguf is not None, device=dev, dtype=dt,
                              backend=backend)
    folder = resolve_model(model, progress)
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    return folder, cfg, load_weights(folder, cfg, dt, dev,
                                     *served_load_args(mode, gguf, backend, dt))


def _values(w) -> tuple[torch.Tensor, bool]:
    """(w as float32, whether the kernels round its input: a block-quantized QuantWeight)."""
    if isinstance(w, QuantWeight):
        return w.dequantize(), not w.fmt.half
    return w.float(), False


@torch.no_grad()
def serve_like(hf, cfg, weights, round_activations: bool = True) -> dict:
    """Give the transformers model ``hf`` the served weights and, with ``round_activations``,
    the served rounding of block-quantized projections' inputs (see the module doc).  In place;
    returns {"rounded": names of the modules whose input is rounded, "handles": the hooks}."""
    rounded, handles = [], []

    def put(module, values, rounds, name):
        module.weight.copy_(values)
        if rounds and round_activations:
            handles.append(module.register_forward_pre_hook(_round_input))
            rounded.append(name)

    for i, (layer, lw) in enumerate(zip(hf.model.layers, weights.layers)):
        for names, field in PROJECTIONS:
            full, rounds = _values(getattr(lw, field))
            for m, part in zip(names,
                               torch.split(full, [cfg.module_shape(m)[0] for m in names], 0)):
                put(layer.get_submodule(HF_MODULE_NAMES[m]), part, rounds,
                    f"model.layers.{i}.{HF_MODULE_NAMES[m]}")
    hf.model.embed_tokens.weight.copy_(_values(weights.embed)[0])
    head, rounds = _values(weights.lm_head)
    put(hf.lm_head, head, rounds, "lm_head")
    return {"rounded": rounded, "handles": handles}
