"""The decoder: embedding, N identical blocks, final norm, LM head.

One block, written once and looped over layers:

    h = x + o( attn( rope(q), rope(k), v ) )      q, k, v = qkv( rmsnorm(x) )
    y = h + down( silu(gate) * up )               gate, up = gate_up( rmsnorm(h) )

Attention is causal with grouped-query heads (H query heads share H / H_kv key/value heads) and an
optional sliding window (Mistral).  It reads and writes a KV cache through ``cache.update(layer,
k, v)``: the scheduler's slot view (kv_cache.RowsView: every row at its own columns,
rows of a prefill chunk right-padded) or ``SCRATCH`` for one pass over whole sequences (scoring,
the router's hidden states).  ``positions`` are per row, and the mask says which cache columns
each query may see.  The backend the model was built with runs the blocks (``backend.runner``)
and every product (``Linear.backend``).  Shapes are noted as (B, T, ...) where they change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pf_engine.model.config import ModelConfig
from pf_engine.model.kv_cache import SlotCache
from pf_engine.model.linear import Linear
from pf_engine.model.loading import LayerWeights, ModelWeights
from pf_engine.model.step import WHOLE, Step


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF Llama does).

    Written out (sum rather than mean, in-place tails): on a decode row this is cheaper
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


def causal_mask(T: int, window: int | None, device) -> torch.Tensor:
    """Which columns each query of a whole-sequence pass sees: bool [1, 1, T, T] (True = attend).

    Query q sees key j iff j <= q and (no window or q - j < window); broadcast over the batch."""
    q = torch.arange(T, device=device).view(T, 1)
    j = torch.arange(T, device=device).view(1, T)
    ok = j <= q
    if window is not None:
        ok &= (q - j) < window
    return ok.view(1, 1, T, T)


class NoCache:
    """The KV "cache" of one pass over whole sequences: each layer attends to the keys and values
    it just computed (nothing is kept, nothing preallocated).  One instance, ``SCRATCH``."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v


SCRATCH = NoCache()


def decode_bias(mask: torch.Tensor, dtype) -> torch.Tensor:
    """bool mask [B, 1, 1, L] -> additive bias [B, 1, 1, L] (0 where seen, -inf elsewhere)."""
    return (torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            .masked_fill_(~mask, float("-inf")))


class Block:
    def __init__(self, cfg: ModelConfig, w: LayerWeights, index: int, backend):
        self.index, self.eps = index, cfg.rms_norm_eps
        self.H, self.H_kv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        f = cfg.intermediate_size
        self.attn_norm, self.mlp_norm = w.attn_norm, w.mlp_norm
        self.qkv = Linear(w.qkv, w.qkv_bias, (cfg.q_size, cfg.kv_size, cfg.kv_size),
                          ("q", "k", "v"),
                          backend)
        self.o = Linear(w.o, w.o_bias, None, ("o",), backend)
        self.gate_up = Linear(w.gate_up, w.gate_up_bias, (f, f), ("gate", "up"), backend)
        self.down = Linear(w.down, w.down_bias, None, ("down",), backend)
        self.linears = (self.qkv, self.o, self.gate_up, self.down)
        self.reduce = None       # tensor parallelism: sums o's and down's outputs over the ranks
        self.backend = backend

    def __call__(self, x, cos, sin, cache, mask, mix=None, step: Step = WHOLE):
        """x [B, T, d]; cos/sin from Rotary.tables; mask: bool [B or 1, 1, T, L], or for a
        decode step (step.py; T == 1) the additive decode_bias [B, 1, 1, L]; mix:
        persona.mix.Mix or None.  The attention is the backend's where it has one
        (Backend.attention), else ``attend``."""
        B, T, _ = x.shape
        dec = step.decode
        if mix is not None:
            mix = mix.enter_layer(self.index, x)
        qkv = (self.qkv.full(rms_norm(x, self.attn_norm, self.eps), mix, dec)
               .view(B, T, self.H + 2 * self.H_kv, self.D))
        a = self.backend.attention(self, qkv, cos, sin, cache, mask)
        if a is None:
            a = self.attend(qkv, cos, sin, cache, mask, dec)
        o = self.o(a, mix, dec)
        x = x + (o if self.reduce is None else self.reduce(o))
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm, self.eps), mix, dec)
        d = self.down(F.silu(gate) * up, mix, dec)
        return x + (d if self.reduce is None else self.reduce(d))

    def attend(self, qkv, cos, sin, cache, mask, dec: bool) -> torch.Tensor:
        """torch's attention: qkv [B, T, H + 2 H_kv, D] -> a [B, T, H * D], the step's k, v
        written through ``cache``."""
        B, T = qkv.shape[:2]
        H, H_kv, D = self.H, self.H_kv, self.D
        qk = apply_rope(qkv[:, :, :H + H_kv], cos, sin)                 # (B, T, H + H_kv, D)
        q = qk[:, :, :H].transpose(1, 2)                                 # (B, H, T, D), pre-scaled
        k = qk[:, :, H:].transpose(1, 2)                                 # (B, H_kv, T, D)
        v = qkv[:, :, H + H_kv:].transpose(1, 2)
        k_all, v_all = cache.update(self.index, k, v)                   # (B, H_kv, L, D)
        if dec:      # grouped heads as one batched matmul, no SDPA dispatch
            s = torch.matmul(q.reshape(B, H_kv, H // H_kv, D), k_all.transpose(-1, -2)) + mask
            a = torch.matmul(s.softmax(-1, dtype=torch.float32).to(v_all.dtype), v_all)
            return a.reshape(B, 1, H * D)                                # (B, 1, H * D)
        a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=1.0,
                                           enable_gqa=H != H_kv)
        return a.transpose(1, 2).reshape(B, T, H * D)


class Decoder:
    def __init__(self, cfg: ModelConfig, weights: ModelWeights, device, backend):
        """``backend`` (pf_engine.backends.Backend): how every product and block runs."""
        self.cfg, self.backend = cfg, backend
        self.embed, self.norm = weights.embed, weights.norm
        self.blocks = [Block(cfg, w, i, backend) for i, w in enumerate(weights.layers)]
        self.head = Linear(weights.lm_head, None, None, (), backend)
        self.rotary = Rotary(cfg, device)
        self.dtype, self.device = weights.embed.dtype, device      # fp32 for a QuantWeight
        self.runner = backend.runner(self)

    def attach(self, bank) -> None:
        """Attach an AdapterBank's experts to every adapted projection (the backend's prepared
        state is rebuilt with them)."""
        for i, blk in enumerate(self.blocks):
            for lin in blk.linears:
                lin.attach({m: bank.lora(i, m) for m in lin.modules}, bank.num_experts)
        self.runner = self.backend.runner(self)

    def detach(self) -> None:
        """Drop the attached experts (runtime/banks.py): the base model, its backend state
        rebuilt."""
        for blk in self.blocks:
            for lin in blk.linears:
                lin.attach({}, 0)
        self.runner = self.backend.runner(self)

    def slot_cache(self, slots: int, max_len: int):
        """A KV pool of ``slots`` rows of ``max_len`` columns for this model's heads."""
        return SlotCache.for_model(self.cfg, slots, max_len, self.dtype, self.device)

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> their embeddings [B, T, d] (a quantized table's rows dequantized)."""
        if isinstance(self.embed, torch.Tensor):
            return self.embed[tokens]
        return self.embed.rows(tokens)

    def hidden(self, tokens: torch.Tensor, layers: int) -> torch.Tensor:
        """The base model's hidden states [B, T, d] of whole sequences tokens [B, T] after the
        first ``layers`` blocks (0: the embeddings): what the sequence router reads."""
        *_, x = self.layer_states(tokens, layers)
        return x

    def layer_states(self, tokens: torch.Tensor, layers: int):
        """Yields the base model's hidden states [B, T, d] of whole sequences tokens [B, T]: the
        embeddings, then the output of each of the first ``layers`` blocks (router training
        reads them all)."""
        x = self.embedding(tokens)
        yield x
        if layers:
            T = tokens.shape[1]
            positions = torch.arange(T, device=tokens.device).expand(tokens.shape)
            cos, sin = self.rotary.tables(positions, self.dtype)
            mask = causal_mask(T, self.cfg.sliding_window, tokens.device)
            for blk in self.blocks[:layers]:
                x = blk(x, cos, sin, SCRATCH, mask)
                yield x

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
                 mix=None, pick: torch.Tensor | None = None, step: Step = WHOLE,
                 keep: tuple[int, ...] = ()):
        """tokens, positions [B, T] -> float32 logits [B, T, vocab] (with ``pick`` [B], the logits
        of row b's position pick[b] only, [B, 1, vocab]); with ``keep`` (a prefill; block indices,
        increasing), also the hidden states entering each of those blocks, [B, T, len(keep), d]:
        (logits, kept), what the prefix cache shares below a bank's first adapted layer and the
        sequence router reads (runtime/prefix_cache.py, runtime/routing.py).

        Writes the keys/values of the T new tokens through ``cache`` (a RowsView or SCRATCH);
        mask: bool [B or 1, 1, T, L].  ``mix``: the persona gates of the B * T rows (None: the
        base model).  ``step`` (step.py): what kind of forward this is, as its caller planned it
        (a decode step: T == 1, every row after its cached columns).
        """
        if step.decode and tokens.shape[1] != 1:
            raise ValueError("a decode step has one token per row; "
                             f"got tokens {list(tokens.shape)}")
        x = self.embedding(tokens)                                     # (B, T, d)
        cos, sin = self.rotary.tables(positions, self.dtype)
        if step.decode:
            mask = decode_bias(mask, self.dtype)
        if not keep:
            x = self.runner(x, cos, sin, cache, mask, mix, step)       # every block
        else:
            x, kept = self.run_blocks(x, cos, sin, cache, mask, mix, step, 0, None, keep)
        if pick is not None:
            x = x[torch.arange(x.shape[0], device=x.device), pick].unsqueeze(1)
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        logits = self.head(x, decode=step.decode).float()
        return (logits, kept) if keep else logits

    def run_blocks(self, x, cos, sin, cache, mask, mix, step: Step, start: int, stop: int | None,
                   keep: tuple[int, ...] = ()):
        """Blocks start..stop-1 one after another over x [B, T, d] (the hidden states entering
        block ``start``): their output; with ``keep`` (block indices in start..stop, increasing),
        (output, the hidden states entering each of them [B, T, len(keep), d])."""
        kept, at = [], start
        for k in keep:
            for blk in self.blocks[at:k]:
                x = blk(x, cos, sin, cache, mask, mix, step)
            kept.append(x)
            at = k
        for blk in self.blocks[at:stop]:
            x = blk(x, cos, sin, cache, mask, mix, step)
        return (x, torch.stack(kept, dim=2)) if keep else x

    def lower(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
              keep: tuple[int, ...]) -> torch.Tensor:
        """The base model's blocks 0..keep[-1]-1 over tokens [B, T] (a prefill), writing their keys
        and values through ``cache``; no head: the hidden states entering each block of ``keep``
        [B, T, len(keep), d].  An "auto" request's first phase (runtime/routing.py): below the
        bank's first adapted layer every persona runs the base model, so the router's input and
        the KV there are computed before its gates are known."""
        cos, sin = self.rotary.tables(positions, self.dtype)
        return self.run_blocks(self.embedding(tokens), cos, sin, cache, mask, None, WHOLE, 0,
                               keep[-1], keep)[1]

    def resume(self, x: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor,
               mix=None, start: int = 0, step: Step = WHOLE) -> None:
        """Blocks start.. over the hidden states x [B, T, d] entering block ``start``, writing
        their keys and values through ``cache``; no head.  The prefix cache's hit whose lower
        layers were shared: the persona's layers from the kept hidden states."""
        cos, sin = self.rotary.tables(positions, self.dtype)
        self.run_blocks(x, cos, sin, cache, mask, mix, step, start, None)
