"""Tensor parallelism on CUDA ranks (nccl), run by the GPU suite: a group of one rank (the
machine the suite gets has one GPU) gives the whole model's logits through the shard's
all-reduce hooks and the vocabulary-split head; two ranks on two GPUs equal one (skipped with
fewer GPUs).
"""
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no GPU (torch.cuda.is_available() is False)")

CUDA = torch.device("cuda")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_one_rank_nccl_group_gives_the_whole_models_logits(hf_model_dir):
    import datetime

    import torch.distributed as dist

    from pf_engine.backends import resolve_backend
    from pf_engine.model.config import ModelConfig
    from pf_engine.model.decoder import Decoder, SCRATCH, causal_mask
    from pf_engine.model.loading import load_weights
    from pf_engine.parallel.group import make_group, reducer
    from pf_engine.parallel.tp import VocabHead, shard_model
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.persona.mix import Mix
    folder, _ = hf_model_dir("qwen2", "tp_gpu", num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, hidden_size=64)
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    w = load_weights(folder, cfg, torch.float32, CUDA)
    bank = AdapterBank.random(cfg, rank=4, seed=3, router=True).to(device=CUDA)
    backend = resolve_backend("torch", CUDA)
    whole = Decoder(cfg, w, CUDA, backend)
    whole.attach(bank)
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True,
                          timeout=datetime.timedelta(seconds=60))
    pg = make_group(0, 1, store.port, 60.0, "cuda", master=store)
    shard = shard_model(cfg, w, bank, backend, CUDA, 0, 1, reducer(pg))
    assert shard.blocks[0].reduce is not None and isinstance(shard.head, VocabHead)
    T = 9
    ids = torch.randint(3, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(2)).to(CUDA)
    pos = torch.arange(T, device=CUDA).expand(1, T)
    gates = torch.rand(1, bank.num_experts, generator=torch.Generator().manual_seed(4)).to(CUDA)
    mix = lambda: Mix.for_rows(gates, torch.zeros(1, dtype=torch.bool, device=CUDA), T)  # noqa: E731
    with torch.inference_mode():
        a = whole(ids, pos, SCRATCH, causal_mask(T, cfg.sliding_window, CUDA), mix=mix())
        b = shard(ids, pos, SCRATCH, causal_mask(T, cfg.sliding_window, CUDA), mix=mix())
    assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_ranks_match_one(hf_model_dir):
    from pf_engine import Engine
    folder, _ = hf_model_dir("llama", "tp_gpu2", num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, hidden_size=64)
    one = Engine.from_pretrained(folder, device="cuda", dtype="fp32", progress=False)
    two = Engine.from_pretrained(folder, device="cuda", dtype="fp32", progress=False, tensor_parallel=2)
    try:
        ids = [[5, 9, 33, 70, 4], [6, 10, 34, 71, 5]]
        a, b = one.logits(ids), two.logits(ids)
        assert (a - b).abs().max() <= 1e-4 * (1 + a.abs().max())
        assert [o.token_ids for o in one.generate(ids, max_new_tokens=8)] == \
            [o.token_ids for o in two.generate(ids, max_new_tokens=8)]
    finally:
        two.close()
