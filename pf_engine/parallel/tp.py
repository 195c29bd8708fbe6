"""One rank's model under tensor parallelism: its shard (shard.py) as an ordinary Decoder whose
blocks sum o's and down's outputs over the ranks with one all-reduce each.

    model = shard_model(cfg, weights, bank, backend, device, rank, world, reduce)

Every rank must make the same calls with the same inputs, in the same order: the all-reduces
inside the blocks pair them up (runtime.py sends rank 0's calls to the workers).  The fused C++
decode step of the cpu backend runs a whole block without a point to reduce at, so shards run
their blocks one by one (backends.base.Blocks); each projection still runs on the backend's
kernels.
"""
from __future__ import annotations

import torch

from pf_engine.backends.base import Blocks
from pf_engine.model.decoder import Decoder
from pf_engine.parallel.shard import ShardedBank, shard_config, shard_weights


def reducer(pg=None):
    """The sum over the ranks of a tensor: through process group ``pg`` (torch.distributed's
    default group when None)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        if pg is None:
            dist.all_reduce(t)
        else:
            pg.allreduce([t]).wait()
        return t
    return reduce


def shard_model(cfg, weights, bank, backend, device, rank: int, world: int, reduce) -> Decoder:
    """This rank's Decoder of the full model's ``weights`` (loading.ModelWeights) and ``bank``
    (an AdapterBank or None)."""
    model = Decoder(shard_config(cfg, world), shard_weights(weights, cfg, rank, world), device, backend)
    if bank is not None:
        model.attach(ShardedBank(bank, cfg, rank, world))
    if world > 1:
        for blk in model.blocks:
            blk.reduce = reduce
        model.runner = Blocks(model)
    return model
