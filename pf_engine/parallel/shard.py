"""Tensor-parallel shards of a model and of its persona experts (Megatron's split, S-LoRA's idea
for the adapters, without its extra all-reduce).

Rank r of N holds, for every block (H heads, H_kv KV heads, head_dim D, FFN width f):

    qkv      column-parallel: q heads r H/N .. (r+1) H/N - 1 and the same slice of the k and v
             heads (H_kv / N each), and their bias rows
    o        row-parallel: o's input columns of those q heads; its bias on rank 0 only
    gate_up  column-parallel: FFN columns r f/N .. (r+1) f/N - 1 of gate and of up
    down     row-parallel: those FFN columns as input; its bias on rank 0 only
    LM head  rows r V/N .. (r+1) V/N - 1 (vocab_slice; tp.VocabHead sums the zero-padded slices
             into the whole logits, or the whole head on every rank: ``head="replicated"``)
    norms, embedding: replicated (a lookup reads B x d of the table)

so each rank runs an ordinary Decoder of ``shard_config`` (H/N heads, H_kv/N KV heads, f/N FFN
columns: its KV cache is sharded by heads) and the outputs of o and down are summed over the
ranks (one all-reduce each, Block.reduce).  Weights stored as bytes (8/4-bit blocks, f16/bf16:
model/qweight.py) shard the same way: rows are independent, and input columns are cut on block
edges (check_blocks).

Persona experts, per projection, y = W x + sum_k g_k s_k B_k (A_k x):

    column-parallel (q, k, v, gate, up)   A replicated, B's rows sliced with W's rows: the
                                          shrink A x is computed on every rank (R_m x d, small),
                                          the expand gives this rank's output slice
    row-parallel (o, down)                A's columns sliced with W's: rank r's partial delta
                                          B (A_r x_r), B replicated.  The expand is linear, so
                                          the sum over ranks of B (A_r x_r) is B (A x): the
                                          block's own all-reduce adds it up, no second one
                                          (S-LoRA all-reduces the shrink result before the
                                          expand instead)

Gates are the same on every rank (broadcast with the step's inputs, or computed from replicated
hidden states by a token router), so experts mix exactly as on one rank.
"""
from __future__ import annotations

import dataclasses

import torch
from pf_kernels.quant import QK

from pf_engine.errors import PFError
from pf_engine.model.config import ModelConfig
from pf_engine.model.loading import LayerWeights, ModelWeights
from pf_engine.model.qweight import QuantWeight

COLUMN = ("q", "k", "v", "gate", "up")
ROW = ("o", "down")


def check(cfg: ModelConfig, n) -> int:
    """``n`` as the rank count, or a PFError line naming what does not divide."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PFError(f"tensor_parallel={n!r}: expected an integer >= 1")
    for what, v in (("num_key_value_heads", cfg.num_key_value_heads),
                    ("num_attention_heads", cfg.num_attention_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if v % n:
            raise PFError(f"tensor_parallel={n}: the model's {what} = {v} is not a multiple of {n}")
    return n


def shard_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The configuration one rank's Decoder is built with."""
    check(cfg, n)
    return dataclasses.replace(cfg, num_attention_heads=cfg.num_attention_heads // n,
                               num_key_value_heads=cfg.num_key_value_heads // n,
                               intermediate_size=cfg.intermediate_size // n, head_dim=cfg.head_dim)


def _rows(t, ranges):
    """Rows of several ranges of a weight (a tensor or a QuantWeight), concatenated."""
    if isinstance(t, torch.Tensor):
        return torch.cat([t[a:b] for a, b in ranges], 0).contiguous()
    return dataclasses.replace(t, data=torch.cat([t.data[a:b] for a, b in ranges], 0).contiguous())


def _columns(w, a: int, b: int, what: str):
    """Input columns a:b of a weight.  A QuantWeight's rows are blocks of QK values: a and b
    must fall on block edges (quantize.QK), and the blocks are cut from GGUF's layout."""
    if isinstance(w, torch.Tensor):
        return w[:, a:b].contiguous()
    if a % QK or b % QK:
        raise PFError(f"{what}: a rank's {b - a} input columns "
                      f"are not whole {w.fmt.name} blocks of {QK}")
    bb = w.fmt.block_bytes
    rows = w.gguf_rows()[:, a // QK * bb:b // QK * bb]
    return QuantWeight.from_gguf(rows, w.fmt, b - a)


def check_blocks(cfg: ModelConfig, n: int) -> None:
    """Byte-stored (8/4/16-bit) shards need each rank's o and down input columns in whole
    blocks of QK values; a PFError line otherwise."""
    for what, cols in (("o", cfg.num_attention_heads // n * cfg.head_dim),
                       ("down", cfg.intermediate_size // n)):
        if cols % QK:
            raise PFError(f"tensor_parallel={n} with 8/4/16-bit weights: "
                          f"each rank's {cols} input columns "
                          f"of {what} are not a multiple of the formats' {QK}-value blocks")


def _only_rank0(bias, rank):
    return None if bias is None else (bias.clone() if rank == 0 else torch.zeros_like(bias))


def qkv_rows(cfg: ModelConfig, rank: int, n: int) -> list[tuple[int, int]]:
    """Rank r's rows of the fused q|k|v weight."""
    q, kv, D = cfg.q_size, cfg.kv_size, cfg.head_dim
    hq, hk = cfg.num_attention_heads // n, cfg.num_key_value_heads // n
    return [(rank * hq * D, (rank + 1) * hq * D),
            (q + rank * hk * D, q + (rank + 1) * hk * D),
            (q + kv + rank * hk * D, q + kv + (rank + 1) * hk * D)]


def module_slice(cfg: ModelConfig, module: str, rank: int, n: int) -> tuple[int, int]:
    """The rows (column-parallel) or input columns (row-parallel) of one projection on rank r."""
    D = cfg.head_dim
    size = {"q": cfg.num_attention_heads * D, "k": cfg.num_key_value_heads * D,
            "v": cfg.num_key_value_heads * D, "o": cfg.num_attention_heads * D,
            "gate": cfg.intermediate_size, "up": cfg.intermediate_size,
            "down": cfg.intermediate_size}[module]
    step = size // n
    return rank * step, (rank + 1) * step


def vocab_slice(vocab: int, rank: int, n: int) -> tuple[int, int]:
    """Rank r's rows of the LM head (any vocab: the slices differ by at most one row)."""
    return rank * vocab // n, (rank + 1) * vocab // n


def shard_layer(w: LayerWeights, cfg: ModelConfig, rank: int, n: int) -> LayerWeights:
    rows = qkv_rows(cfg, rank, n)
    f0, f1 = module_slice(cfg, "gate", rank, n)
    f = cfg.intermediate_size
    o0, o1 = module_slice(cfg, "o", rank, n)
    gu = [(f0, f1), (f + f0, f + f1)]
    return LayerWeights(
        attn_norm=w.attn_norm, qkv=_rows(w.qkv, rows),
        qkv_bias=None if w.qkv_bias is None else _rows(w.qkv_bias, rows),
        o=_columns(w.o, o0, o1, "o"), o_bias=_only_rank0(w.o_bias, rank),
        mlp_norm=w.mlp_norm, gate_up=_rows(w.gate_up, gu),
        gate_up_bias=None if w.gate_up_bias is None else _rows(w.gate_up_bias, gu),
        down=_columns(w.down, f0, f1, "down"), down_bias=_only_rank0(w.down_bias, rank))


def shard_weights(w: ModelWeights, cfg: ModelConfig, rank: int, n: int,
                  head: str = "sharded") -> ModelWeights:
    """Rank r's ModelWeights (see the module doc); the embedding stays whole, the head too
    when ``head`` is "replicated"."""
    lm_head = (w.lm_head if head == "replicated"
               else _rows(w.lm_head, [vocab_slice(cfg.vocab_size, rank, n)]))
    return ModelWeights(embed=w.embed, layers=[shard_layer(l, cfg, rank, n) for l in w.layers],
                        norm=w.norm, lm_head=lm_head)


class ShardedBank:
    """What Decoder.attach reads of an AdapterBank (``lora``, ``num_experts``), for rank r."""

    def __init__(self, bank, cfg: ModelConfig, rank: int, n: int):
        self.bank, self.cfg, self.rank, self.n = bank, cfg, rank, n
        self.num_experts = bank.num_experts

    def lora(self, layer: int, module: str):
        lw = self.bank.lora(layer, module)
        if lw is None or self.n == 1:
            return lw
        a0, a1 = module_slice(self.cfg, module, self.rank, self.n)
        if module in COLUMN:
            return dataclasses.replace(lw, b=lw.b[a0:a1].contiguous())
        return dataclasses.replace(lw, a=lw.a[:, a0:a1].contiguous())
