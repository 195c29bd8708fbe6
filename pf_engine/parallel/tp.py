"""One rank's model under tensor parallelism: its shard (shard.py) as an ordinary Decoder whose
blocks sum o's and down's outputs over the ranks with one all-reduce each.

    model = shard_model(cfg, weights, bank, backend, device, rank, world, reduce, head="sharded")

Every rank must make the same calls with the same inputs, in the same order: the all-reduces
inside the blocks pair them up (runtime.py sends rank 0's calls to the workers).  ``reduce`` is
set on every block and the backend's runner is rebuilt with it: the cpu backend's fused decode
step reduces inside its C++ call when ``reduce`` carries a ShmGroup (shm.ShmReducer's
``group``), and runs the blocks one by one (model.decoder.Block) otherwise.
"""
from __future__ import annotations

from pf_engine.model.decoder import Decoder
from pf_engine.parallel.shard import ShardedBank, shard_config, shard_weights, vocab_slice


class VocabHead:
    """The LM head of a rank holding rows v0:v1 of it: logits [..., V] = the sum over the ranks
    of this rank's logits [..., v1 - v0] written into zeros at v0:v1 (one all-reduce of B x V
    per forward; exact, each logit comes from one rank)."""

    def __init__(self, head, vocab: int, v0: int, v1: int, reduce):
        self.head, self.vocab, self.v0, self.v1, self.reduce = head, vocab, v0, v1, reduce

    def __getattr__(self, name):
        return getattr(self.head, name)

    def __call__(self, x, decode: bool = False):
        part = self.head(x, decode=decode).float()
        out = part.new_zeros(*part.shape[:-1], self.vocab)
        out[..., self.v0:self.v1] = part
        return self.reduce(out)


def shard_model(cfg, weights, bank, backend, device, rank: int, world: int, reduce,
                head: str = "sharded") -> Decoder:
    """This rank's Decoder of the full model's ``weights`` (loading.ModelWeights) and ``bank``
    (an AdapterBank or None); ``head``: the LM head sharded by vocabulary or replicated."""
    model = Decoder(shard_config(cfg, world), shard_weights(weights, cfg, rank, world, head),
                    device, backend)
    if bank is not None:
        model.attach(ShardedBank(bank, cfg, rank, world))
    if reduce is not None:          # world 1 too: a group of one (the GPU suite's nccl check)
        for blk in model.blocks:
            blk.reduce = reduce
        model.runner = backend.runner(model)
        if head == "sharded":
            model.head = VocabHead(model.head, cfg.vocab_size,
                                   *vocab_slice(cfg.vocab_size, rank, world), reduce)
    return model
