"""One rank's model under tensor parallelism: its shard (shard.py) as an ordinary Decoder whose
blocks sum o's and down's outputs over the ranks with one all-reduce each.

    dist.init_process_group("gloo", ...)                    # or nccl, one GPU per rank
    model = shard_model(cfg, weights, bank, backend, device)   # every rank, the same call
    logits = model(tokens, positions, Scratch, mask, mix)   # every rank, the same inputs

Every rank must make the same calls with the same inputs, in the same order: the all-reduces
inside the blocks pair them up.  The fused C++ decode step of the cpu backend runs a whole block
without a point to reduce at, so shards run their blocks one by one (backends.base.Blocks); each
projection still runs on the backend's kernels.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pf_engine.backends.base import Blocks
from pf_engine.model.decoder import Decoder
from pf_engine.parallel.shard import ShardedBank, shard_config, shard_weights


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (in place on a contiguous copy)."""
    t = t.contiguous()
    dist.all_reduce(t)
    return t


def shard_model(cfg, weights, bank, backend, device, rank: int | None = None,
                world: int | None = None) -> Decoder:
    """This rank's Decoder of the full model's ``weights`` (loading.ModelWeights) and ``bank``
    (an AdapterBank or None)."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    model = Decoder(shard_config(cfg, world), shard_weights(weights, cfg, rank, world), device, backend)
    if bank is not None:
        model.attach(ShardedBank(bank, cfg, rank, world))
    if world > 1:
        for blk in model.blocks:
            blk.reduce = all_reduce
        model.runner = Blocks(model)
    return model
