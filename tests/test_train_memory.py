"""pf-train's sizes from memory (pf_engine/train/memory.py): the planner's choices, the weight
count it subtracts, and the Trunk's LM head in chunks and its passes in rows, which must give
the same numbers as at once while holding less."""
import random

import numpy as np
import pytest
import torch

from conftest import build_hf_model
from pf_engine.errors import PFError
from pf_engine.train.experts import Item
from pf_engine.train.memory import BUDGET, Shape, plan, step_rows, weight_bytes
from pf_engine.train.sequences import Sequence

GiB = 2**30
# a Llama-3.1-8B-like shape: bf16, the top 12 of 32 layers adapted, checkpointing on
LLAMA8B = Shape(hidden=4096, mlp=14336, vocab=128256, top_layers=12, value_bytes=2,
                checkpointing=True, max_positions=131072)


def test_plenty_of_memory_gives_the_cap_and_the_whole_head():
    p = plan(60 * GiB, LLAMA8B, rows=12)
    assert (p.max_len, p.head_chunk) == (512, 0) and p.rows == 64
    assert p.step_bytes <= BUDGET * p.free_bytes


def test_less_memory_chunks_the_head_then_shortens_the_sequences():
    """A few GiB: 512 tokens still, the head in chunks; less: shorter sequences; too little:
    a one-line error naming the memory."""
    mid = plan(4 * GiB, LLAMA8B, rows=12)
    assert mid.max_len == 512 and 64 <= mid.head_chunk < 12 * 512
    low = plan(int(0.6 * GiB), LLAMA8B, rows=12)
    assert low.max_len < 512 and low.head_chunk > 0
    for p in (mid, low):
        assert p.step_bytes <= BUDGET * p.free_bytes
    with pytest.raises(PFError, match=r"^not enough GPU memory to train: 12 rows of 64 tokens "
                                      r"need [\d.]+ GiB of the 0.05 GiB free$"):
        plan(int(0.05 * GiB), LLAMA8B, rows=12)


def test_asked_length_is_checked_not_changed():
    assert plan(60 * GiB, LLAMA8B, rows=12, max_len=2048).max_len == 2048
    with pytest.raises(PFError, match=r"^max-len 4096: 12 rows of 4096 tokens need .* GiB of the "
                                      r"2.00 GiB free; pass a smaller --max-len$"):
        plan(2 * GiB, LLAMA8B, rows=12, max_len=4096)


def test_short_context_caps_the_length_and_checkpointing_saves_memory():
    short = Shape(64, 128, 500, 2, 4, True, max_positions=300)
    assert plan(GiB, short, rows=4).max_len == 256
    with pytest.raises(PFError, match="^max-len 512: the model reads at most 300 tokens$"):
        plan(GiB, short, rows=4, max_len=512)
    kept = LLAMA8B.row_bytes()
    full = Shape(**{**LLAMA8B.__dict__, "checkpointing": False}).row_bytes()
    assert full > 5 * kept


def test_random_shapes_stay_in_budget():
    rng = random.Random(3)
    for _ in range(200):
        s = Shape(rng.choice([64, 512, 2048, 4096, 8192]), rng.choice([256, 4096, 14336, 28672]),
                  rng.choice([500, 32000, 151936]), rng.randint(1, 40), rng.choice([2, 4]),
                  rng.random() < 0.5, rng.choice([128, 2048, 1 << 20]))
        free, rows = int(rng.uniform(0.01, 80) * GiB), rng.randint(1, 24)
        try:
            p = plan(free, s, rows)
        except PFError:
            continue
        assert p.step_bytes <= BUDGET * free and 64 <= p.max_len <= 512 and p.rows >= 1


def test_step_rows_is_the_largest_batch():
    from pf_engine.train.recipe import Recipe
    assert step_rows(Recipe()) == 16                 # the joint stage: 4 situations x 2 x 2
    assert step_rows(Recipe(pairs=8, joint_batch=2)) == 20


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_weight_bytes_counts_the_parameters(arch):
    """The config's count against the model's own parameters: what is left out is the norms
    (and qwen2's q/k/v biases), well under 1% at any real size and a few % on a tiny one."""
    m = build_hf_model(arch, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000)
    count = sum(p.numel() for p in m.parameters())
    est = weight_bytes(m.config, 2) / 2
    assert 0.97 * count <= est <= count


def _trunk(tiny_chat_model, head_chunk=0, rows=16):
    """test_train_device's peft model with random B and its trunk, sized as given."""
    from test_train_device import _peft
    pm, trunk = _peft(tiny_chat_model[0])
    trunk.head_chunk, trunk.rows = head_chunk, rows
    return pm, trunk


def _items(n=5):
    rng = np.random.default_rng(4)
    return [Item(Sequence(rng.integers(3, 200, 5).tolist(), rng.integers(3, 200, 4 + i).tolist()))
            for i in range(n)]


def _head_rows(trunk):
    """The most rows the LM head takes in one call (forward or recompute), recorded."""
    seen = [0]
    trunk.model.lm_head.register_forward_hook(
        lambda m, args, out: seen.__setitem__(0, max(seen[0], args[0].shape[0])))
    return seen


def _loss_and_grads(tiny_chat_model, head_chunk):
    pm, trunk = _trunk(tiny_chat_model, head_chunk)
    items = _items()
    trunk.cache(items)
    trunk.cache_base_top(items[:3])
    seen = _head_rows(trunk)
    loss = -trunk.log_likelihood(items).mean() + trunk.kl_to_base(items[:3], first=0.0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return loss.item(), grads, seen[0]


def test_head_in_chunks_gives_the_same_loss_and_gradients_seeing_fewer_rows(tiny_chat_model):
    """head_chunk 3: the log-likelihood and KL terms and every adapter gradient as at once (fp32
    rounding), and the LM head never takes more than 3 tokens, also when backward recomputes."""
    l0, g0, seen0 = _loss_and_grads(tiny_chat_model, 0)
    l1, g1, seen1 = _loss_and_grads(tiny_chat_model, 3)
    assert l1 == pytest.approx(l0, abs=1e-6) and g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5)
    assert seen1 == 3 and seen0 > 3 * 5


def test_rows_split_the_cache_passes_only(tiny_chat_model):
    """rows 2: the cache runs 2 sequences at a time, same states; log_likelihood keeps the
    caller's rows together (a routed batch's LoRA scalings are per row)."""
    _, whole = _trunk(tiny_chat_model)
    _, split = _trunk(tiny_chat_model, rows=2)
    batches = []
    split.model.model.layers[0].register_forward_hook(
        lambda m, args, out: batches.append(args[0].shape[0]))
    a, b = _items(), _items()
    whole.cache(a)
    split.cache(b)
    assert batches == [2, 2, 1]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.hidden, y.hidden, atol=1e-6, rtol=1e-6)
    rows = []
    split.model.model.norm.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    with torch.no_grad():
        torch.testing.assert_close(split.log_likelihood(b), whole.log_likelihood(a),
                                   atol=1e-6, rtol=1e-6)
    assert rows == [5]


def _train_log(tiny_chat_model, head_chunk, rows):
    from pf_engine.train.experts import Pools, train_expert
    from pf_engine.train.recipe import Recipe
    pm, trunk = _trunk(tiny_chat_model, head_chunk, rows)
    items = _items(9)
    trunk.cache(items)
    trunk.cache_base_top(items[6:])
    with torch.no_grad():
        for it, lp in zip(items, trunk.log_likelihood(items).tolist()):
            it.base_lp = lp
    params = [p for p in pm.parameters() if p.requires_grad]
    rc = Recipe(steps=4, lr=1e-2, pairs=2, retain=2, distill=3, raw=0, arith=0)
    log, _ = train_expert(trunk, params, Pools(items[:2], items[2:4], items[4:6], items[6:]),
                          rc, seed=0)
    return log


def test_expert_steps_train_the_same_with_the_head_in_chunks(tiny_chat_model):
    """Four expert steps (own, twin, kept texts and the KL term) with head_chunk 3 and rows 2
    follow the same losses as with the whole head."""
    whole, chunked = _train_log(tiny_chat_model, 0, 16), _train_log(tiny_chat_model, 3, 2)
    for a, b in zip(whole, chunked):
        for k in ("loss", "nll", "pair", "kl"):
            assert b[k] == pytest.approx(a[k], abs=2e-5), (a["step"], k)
    assert whole[-1]["loss"] != whole[0]["loss"]
def test_gpu_plan_reads_the_config_and_takes_the_training_copy_off(tiny_chat_model, monkeypatch):
    """gpu_plan on a model folder with the free memory faked: the shape from its config, the
    training copy's weights off the free memory, the recipe's --max-len checked."""
    from pf_engine.train import memory
    from pf_engine.train.recipe import Recipe
    folder, model = tiny_chat_model
    free = 64 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    got = memory.gpu_plan(folder, Recipe(first_layer=-1), "cuda", 2)
    shape = Shape.of(model.config, 1, 2, True)
    assert got == plan(free - weight_bytes(model.config, 2), shape, step_rows(Recipe()))
    assert got.max_len == min(512, model.config.max_position_embeddings)
    again = memory.gpu_plan(folder, Recipe(first_layer=-1, max_len=got.max_len), "cuda", 2,
                            loaded=True)
    assert again == plan(free, shape, step_rows(Recipe()), got.max_len)
    with pytest.raises(PFError, match="^max-len 100000: "):
        memory.gpu_plan(folder, Recipe(first_layer=-1, max_len=100000), "cuda", 2)
    with pytest.raises(PFError, match="^first_layer 18 is outside the model's 0..1$"):
        memory.gpu_plan(folder, Recipe(), "cuda", 2)
