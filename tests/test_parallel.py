"""Tensor-parallel shards (pf_engine/parallel): two gloo ranks on 127.0.0.1, each a process
holding half of every block and of every persona expert, give the logits of the whole model
(1e-4), for the base model and every persona kind, on the tiny Llama and Qwen2 fixtures; bad
rank counts are one line.  The engine-level API (tensor_parallel=N) builds on this.
"""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pf_engine.errors import PFError
from pf_engine.model.config import ModelConfig

PERSONAS = [None, "top2", "dense", "auto", "token"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(folder: str, rank: int, world: int):
    """Logits [len(PERSONAS), T, V] of fixed tokens under each persona kind: the whole model
    (world 1) or this rank's shard (inside a process group)."""
    from pf_engine.backends import resolve_backend
    from pf_engine.model.decoder import Decoder, Scratch, causal_mask
    from pf_engine.model.loading import load_weights
    from pf_engine.parallel.tp import shard_model
    from pf_engine.persona.bank import BIG_FIVE, AdapterBank
    from pf_engine.persona.mix import Mix
    from pf_engine.persona.specs import Personas
    torch.set_num_threads(1)
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    w = load_weights(folder, cfg, torch.float32, torch.device("cpu"))
    bank = AdapterBank.random(cfg, rank=4, seed=3, router=True)
    backend = resolve_backend("torch", torch.device("cpu"))
    if world == 1:
        model = Decoder(cfg, w, torch.device("cpu"), backend)
        model.attach(bank)
    else:
        model = shard_model(cfg, w, bank, backend, torch.device("cpu"))
    T = 11
    ids = torch.randint(3, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(7))
    specs = {None: None, "top2": {BIG_FIVE[0]: 0.7, BIG_FIVE[5]: 0.3},
             "dense": {n: 0.1 * (i + 1) for i, n in enumerate(BIG_FIVE)}, "auto": "auto", "token": "token"}
    out = []
    with torch.inference_mode():
        for p in PERSONAS:
            personas = Personas(bank, [specs[p]], 1)
            personas.route(model, ids)              # "auto": the router reads the shards' hidden
            mix = None if not personas.any else Mix.for_rows(personas.rows, personas.token_rows, T,
                                                             bank.token_router)
            pos = torch.arange(T).expand(1, T)
            out.append(model(ids, pos, Scratch, causal_mask(T, cfg.sliding_window, ids.device), mix=mix)[0])
    return torch.stack(out)


def _rank(rank: int, world: int, folder: str, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    try:
        lg = _logits(folder, rank, world)
        if rank == 0:
            torch.save(lg, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-biases"])
def test_two_gloo_ranks_give_the_whole_models_logits(hf_model_dir, tmp_path, arch):
    """qwen2: q/k/v biases (sharded with their rows); llama-biases: o and down biases too (added
    once, on rank 0)."""
    extra = dict(attention_bias=True, mlp_bias=True) if arch == "llama-biases" else {}
    folder, _ = hf_model_dir(arch.split("-")[0], f"tp_{arch}", num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, hidden_size=64, **extra)
    out = str(tmp_path / "tp.pt")
    mp.start_processes(_rank, args=(2, folder, _free_port(), out), nprocs=2, join=True,
                       start_method="spawn")
    tp, one = torch.load(out), _logits(folder, 0, 1)
    assert tp.shape == one.shape
    for i, p in enumerate(PERSONAS):
        assert (tp[i] - one[i]).abs().max() <= 1e-4 * (1 + one[i].abs().max()), p
    assert not torch.allclose(one[0], one[1])        # the personas do change the logits


@pytest.mark.parametrize("n,words", [(3, "num_key_value_heads = 2 is not a multiple of 3"),
                                     (0, "expected an integer >= 1"), ("2", "expected an integer")])
def test_bad_rank_counts_are_one_line(hf_model_dir, n, words):
    from pf_engine.parallel.shard import shard_config
    folder, _ = hf_model_dir("llama", "tp_bad", num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, hidden_size=64)
    cfg = ModelConfig.from_file(os.path.join(folder, "config.json"))
    with pytest.raises(PFError) as e:
        shard_config(cfg, n)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)
