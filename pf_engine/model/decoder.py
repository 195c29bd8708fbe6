"""The decoder: embedding, N identical blocks, final norm, LM head.

One block, written once and looped over layers:

    h = x + o( attn( rope(q), rope(k), v ) )      q, k, v = qkv( rmsnorm(x) )
    y = h + down( silu(gate) * up )               gate, up = gate_up( rmsnorm(h) )

Attention is causal with grouped-query heads (H query heads share H / H_kv key/value heads), an
optional sliding window (Mistral), and reads/writes the preallocated KV cache.  Batches are
left-padded (see kv_cache.py): ``positions`` are per row, and ``attention_mask`` says which cache
columns each query may see.  Shapes are noted as (B, T, ...) where they change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pf_engine.backends.cpu import decode as cpu_decode
from pf_engine.model.config import ModelConfig
from pf_engine.runtime.kv_cache import KVCache
from pf_engine.model.loading import LayerWeights, ModelWeights
from pf_engine.persona.mix import Linear, Mix, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF Llama does).

    Written out (sum rather than mean, in-place tails): on a decode row this is ~1.5x cheaper
    than F.rms_norm or the textbook form on CPU, where per-op overhead dominates."""
    xf = x if x.dtype == torch.float32 else x.float()
    inv = (xf * xf).sum(-1, keepdim=True).mul_(1.0 / x.shape[-1]).add_(eps).rsqrt_()
    y = xf * inv
    return weight * (y if y.dtype == x.dtype else y.to(x.dtype))


class Rotary:
    """RoPE for q and k together, in the half-split layout HF Llama uses.

    x * cos + rotate_half(x) * sin with rotate_half(x) = cat(-x2, x1) = roll(x, D/2) * sign,
    sign = [-1] * D/2 + [1] * D/2; the tables hold cos and sign * sin [max_pos, D] in fp32.
    ``tables`` also folds the attention scale 1/sqrt(D) into the q heads, so that attention
    needs no separate scaling.
    """

    def __init__(self, cfg: ModelConfig, device):
        pos = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, cfg.inv_freq())                      # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1).to(device)             # [P, D]
        half = cfg.head_dim // 2
        sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device)
        self.cos, self.sin = emb.cos(), emb.sin() * sign
        H, H_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_scale = torch.cat([torch.full((H,), cfg.head_dim ** -0.5),
                                     torch.ones(H_kv)]).view(H + H_kv, 1).to(device)

    def tables(self, positions: torch.Tensor, dtype):
        """positions [B, T] -> cos, sin [B, T, H + H_kv, D] in ``dtype`` (q heads pre-scaled)."""
        cos = self.cos[positions].unsqueeze(2) * self.head_scale
        sin = self.sin[positions].unsqueeze(2) * self.head_scale
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated: x * cos + roll(x, D/2) * sin (sin carries rotate_half's sign)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_mask(pad: torch.Tensor, start: int, T: int, window: int | None) -> torch.Tensor:
    """Which cache columns each query sees: bool [B, 1, T, start + T] (True = attend).

    Row b's real tokens occupy columns pad[b]: of the cache.  Query column q sees key column j iff
    pad[b] <= j <= q and (no window or q - j < window).  A padding query (q < pad[b]) sees only
    itself, so that no row of the softmax is empty (its output is never used).
    """
    L = start + T
    q = torch.arange(start, L, device=pad.device).view(1, T, 1)
    j = torch.arange(L, device=pad.device).view(1, 1, L)
    p = pad.view(-1, 1, 1)
    ok = (j >= p) & (j <= q)
    if window is not None:
        ok &= (q - j) < window
    ok |= (q < p) & (j == q)
    return ok.unsqueeze(1)


def decode_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """bool mask [B, 1, 1, L] -> additive bias [B, 1, 1, L] (0 where seen, -inf elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class Block:
    def __init__(self, cfg: ModelConfig, w: LayerWeights, index: int):
        self.index, self.eps = index, cfg.rms_norm_eps
        self.H, self.H_kv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        f = cfg.intermediate_size
        self.attn_norm, self.mlp_norm = w.attn_norm, w.mlp_norm
        self.qkv = Linear(w.qkv, w.qkv_bias, (cfg.q_size, cfg.kv_size, cfg.kv_size), ("q", "k", "v"))
        self.o = Linear(w.o, w.o_bias, None, ("o",))
        self.gate_up = Linear(w.gate_up, w.gate_up_bias, (f, f), ("gate", "up"))
        self.down = Linear(w.down, w.down_bias, None, ("down",))
        self.linears = (self.qkv, self.o, self.gate_up, self.down)

    def __call__(self, x, cos, sin, cache: KVCache, start: int, mask, mix: Mix | None = None):
        """x [B, T, d]; cos/sin from Rotary.tables; mask: bool [B, 1, T, L] for T > 1, or the
        additive decode_bias [B, 1, 1, L] for T == 1."""
        B, T, _ = x.shape
        H, H_kv, D = self.H, self.H_kv, self.D
        if mix is not None:
            mix = mix.for_layer(self.index, x)
        qkv = self.qkv.full(rms_norm(x, self.attn_norm, self.eps), mix).view(B, T, H + 2 * H_kv, D)
        qk = apply_rope(qkv[:, :, :H + H_kv], cos, sin)                 # (B, T, H + H_kv, D)
        q = qk[:, :, :H].transpose(1, 2)                                 # (B, H, T, D), pre-scaled
        k = qk[:, :, H:].transpose(1, 2)                                 # (B, H_kv, T, D)
        v = qkv[:, :, H + H_kv:].transpose(1, 2)
        k_all, v_all = cache.update(self.index, start, k, v)            # (B, H_kv, L, D)
        if T == 1:   # decode: grouped heads as one batched matmul, no SDPA dispatch
            s = torch.matmul(q.reshape(B, H_kv, H // H_kv, D), k_all.transpose(-1, -2)) + mask
            a = torch.matmul(s.softmax(-1, dtype=torch.float32).to(v_all.dtype), v_all)
            a = a.reshape(B, 1, H * D)                                   # (B, 1, H * D)
        else:
            a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=1.0,
                                               enable_gqa=H != H_kv)
            a = a.transpose(1, 2).reshape(B, T, H * D)
        x = x + self.o(a, mix)
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, self.eps), mix)
        return x + self.down(F.silu(gate) * up, mix)


class Decoder:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device):
        self.cfg = cfg
        self.embed, self.norm, self.lm_head = weights.embed, weights.norm, weights.lm_head
        self.blocks = [Block(cfg, w, i) for i, w in enumerate(weights.layers)]
        self.rotary = Rotary(cfg, device)
        self.dtype, self.device = weights.embed.dtype, device

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.cfg
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       self.dtype, self.device)

    def attach(self, bank) -> None:
        """Attach an AdapterBank's experts to every adapted projection."""
        for i, blk in enumerate(self.blocks):
            for lin in blk.linears:
                lin.attach({m: bank.lora(i, m) for m in lin.modules})

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               layers: int) -> torch.Tensor:
        """The base model's hidden states [B, T, d] after the first ``layers`` blocks (0: the
        embeddings), on a scratch cache: what the sequence router reads."""
        *_, x = self.layer_states(tokens, positions, mask, layers)
        return x

    def layer_states(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     layers: int):
        """Yields the base model's hidden states [B, T, d]: the embeddings, then the output of
        each of the first ``layers`` blocks (a scratch cache; router training reads them all)."""
        x = self.embed[tokens]
        yield x
        if layers:
            cos, sin = self.rotary.tables(positions, self.dtype)
            cache = self.new_cache(tokens.shape[0], tokens.shape[1])
            if tokens.shape[1] == 1:
                mask = decode_bias(mask, self.dtype)
            for blk in self.blocks[:layers]:
                x = blk(x, cos, sin, cache, 0, mask)
                yield x

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int,
                 mask: torch.Tensor, last_only: bool = False, mix: Mix | None = None,
                 pick: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions [B, T] -> float32 logits [B, T, vocab] ([B, 1, vocab] if last_only;
        with ``pick`` [B], the logits of row b's position pick[b] only, [B, 1, vocab]).

        Writes keys/values of the T new tokens into cache columns start:start+T.  ``mix``: the
        persona gates of the B * T rows (None: the base model).
        """
        x = self.embed[tokens]                                         # (B, T, d)
        cos, sin = self.rotary.tables(positions, self.dtype)
        if tokens.shape[1] == 1:
            mask = decode_bias(mask, self.dtype)
        if tokens.shape[1] == 1 and cpu_decode.eligible(self, x, cache, mix):
            cos, sin, mask = cpu_decode.prepare(cache, cos, sin, mask)
            for blk in self.blocks:                                    # csrc/cpu, same maths
                x = cpu_decode.block_step(blk, x, cos, sin, cache, mask, mix)
        else:
            for blk in self.blocks:
                x = blk(x, cos, sin, cache, start, mask, mix)
        if pick is not None:
            x = x[torch.arange(x.shape[0], device=x.device), pick].unsqueeze(1)
        elif last_only:
            x = x[:, -1:]
        B, T, d = x.shape
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return linear(x.reshape(B * T, d), self.lm_head, decode=T == 1).float().view(B, T, -1)
