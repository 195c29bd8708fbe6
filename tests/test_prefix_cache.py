"""The persona-aware prefix cache (pf_engine/runtime/prefix_cache.py): greedy output with the cache
equals the output without it for every persona kind, for requests that share a prefix and differ
in persona, for prefixes that end inside a block, under eviction and with cancellation; the key
must hold the persona (a test shows a token-only key gives wrong output).

Offline, CPU, fp32: a tiny random Llama with a random bank of ten experts (both routers).
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.errors import RequestError
from pf_engine.model.config import ModelConfig
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.runtime import prefix_cache as pc
from pf_engine.runtime.prefix_cache import BLOCK, PrefixCache
from pf_engine.generation.sampling import SamplingParams

STRONG_A = {BIG_FIVE[0]: 2.5, BIG_FIVE[4]: 1.5}
STRONG_B = {BIG_FIVE[7]: 3.0}
PERSONAS = [None, {BIG_FIVE[0]: 0.7, BIG_FIVE[3]: 0.3}, "auto", "token",
            {n: 0.1 * (i + 1) for i, n in enumerate(BIG_FIVE)}, STRONG_A, STRONG_B]


@pytest.fixture(scope="module")
def eng(hf_model_dir):
    folder, _ = hf_model_dir("llama", "prefix_base")
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=8, seed=5, router=True)
    return Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu", dtype="fp32")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(eng, cache, specs, slots=3, arrive=None, cancel=None, max_len=160, logprobs=None):
    """Greedy outputs of specs [(ids, persona, n)] through one scheduler using ``cache``
    (None: off), requests arriving at steps ``arrive`` (default: one per step, in order)."""
    sched = eng.new_scheduler(slots=slots, max_len=max_len, prefill_budget=24, background=False)
    sched.prefix = cache
    arrive = arrive or list(range(len(specs)))
    reqs, step = {}, 0
    while len(reqs) < len(specs) or sched.pending():
        for i, s in enumerate(arrive):
            if s == step:
                p, persona, n = specs[i]
                reqs[i] = sched.submit(p, SamplingParams(max_new_tokens=n, logprobs=logprobs),
                                       persona)
        if cancel:
            cancel(step, reqs)
        sched.step()
        step += 1
    return [reqs[i] for i in range(len(specs))]


def tokens(reqs):
    return [(r.result().token_ids, r.result().finish_reason) for r in reqs]


def fresh(eng, gb=0.01):
    return PrefixCache.for_engine(eng, gb)


def test_cache_on_equals_off_for_every_persona_kind(eng):
    """Two system prompts, every persona kind on each, different user turns: outputs equal the
    cache-off run's, and later requests hit (explicit and base requests of one system prompt
    share it only within their persona root)."""
    systems = [ids(45, 1), ids(38, 2)]
    specs = [(systems[i % 2] + ids(5 + i % 4, 100 + i), PERSONAS[i % len(PERSONAS)], 6)
             for i in range(2 * len(PERSONAS))]
    specs += specs[:len(PERSONAS)]                         # the same requests again: all hit
    cache = fresh(eng)
    on = run(eng, cache, specs)
    off = run(eng, None, specs)
    assert tokens(on) == tokens(off)
    assert cache.stats.hits >= len(PERSONAS) and cache.stats.hit_tokens >= 2 * BLOCK * len(PERSONAS)
    assert all(r.cached_tokens % BLOCK == 0 and r.cached_tokens < len(r.ids) for r in on)
    assert any(r.cached_tokens for r in on[-len(PERSONAS):])


@pytest.mark.parametrize("drop_persona", [False, True])
def test_one_personas_kv_is_never_handed_to_another(eng, monkeypatch, drop_persona):
    """One prompt under two strong personas, one after the other.  With the persona in the key
    the second request misses and equals its cache-off self; with a key of tokens alone (the
    bug class this guards against) it hits the first persona's KV and its output changes."""
    if drop_persona:
        monkeypatch.setattr(pc, "persona_root", lambda r: ("base",))
        monkeypatch.setattr("pf_engine.runtime.scheduler.persona_root", lambda r: ("base",))
    p = ids(70, 7)
    specs = [(p, STRONG_A, 12), (p, STRONG_B, 12), (p, None, 12)]
    cache = fresh(eng)
    on = run(eng, cache, specs, arrive=[0, 8, 16])
    off = run(eng, None, specs, arrive=[0, 8, 16])
    if not drop_persona:
        assert tokens(on) == tokens(off)
        assert [r.cached_tokens for r in on] == [0, 0, 0]
    else:
        assert on[1].cached_tokens > 0 and tokens(on) != tokens(off)


def test_prefix_ending_inside_a_block(eng):
    """A shared prefix of 2 blocks + 7 tokens: the second request reuses the 2 whole blocks and
    prefills the rest, from the partial block's start."""
    shared = ids(2 * BLOCK + 7, 9)
    specs = [(shared + ids(9, 10), STRONG_A, 8), (shared + ids(4, 11), STRONG_A, 8)]
    cache = fresh(eng)
    on = run(eng, cache, specs, arrive=[0, 6])
    assert on[1].cached_tokens == 2 * BLOCK
    assert tokens(on) == tokens(run(eng, None, specs, arrive=[0, 6]))


def test_a_hit_never_covers_the_last_prompt_token(eng):
    """A prompt of exactly 3 blocks asked twice: the second reuses 2 (the last token's logits
    give the first new one), and a prompt shorter than a block caches nothing."""
    p = ids(3 * BLOCK, 12)
    cache = fresh(eng)
    on = run(eng, cache, [(p, None, 5), (p, None, 5), (p[:BLOCK - 1], None, 3)], arrive=[0, 6, 7])
    assert [r.cached_tokens for r in on] == [0, 2 * BLOCK, 0]
    assert tokens(on) == tokens(run(eng, None, [(p, None, 5), (p, None, 5), (p[:BLOCK - 1], None, 3)]))


def test_under_eviction(eng):
    """A budget of 4 blocks and prompts of up to 3 blocks each: blocks are evicted, outputs are
    unchanged, and the cache never holds more than its budget."""
    cache = fresh(eng)
    cache.budget_bytes, cache.capacity = 4 * cache.block_bytes, 4
    systems = [ids(2 * BLOCK + 3, 20 + k) for k in range(3)]
    specs = [(systems[i % 3] + ids(4, 40 + i), PERSONAS[i % 3], 5) for i in range(12)]
    seen = []
    on = run(eng, cache, specs, slots=2,
             cancel=lambda step, reqs: seen.append(cache.blocks))
    assert cache.stats.evictions > 0 and max(seen) <= 4
    assert tokens(on) == tokens(run(eng, None, specs, slots=2))


def test_with_cancellation(eng):
    """A request cancelled while its prompt is prefilled stores nothing; one cancelled after
    its first tokens has stored its prompt; the others' outputs are unchanged."""
    shared = ids(3 * BLOCK + 2, 30)
    specs = [(shared + ids(3, 31), "token", 8), (shared + ids(5, 32), "token", 8),
             (shared + ids(2, 33), "token", 8), (shared + ids(6, 34), "token", 8)]

    def cancel(step, reqs):
        if step == 1 and 0 in reqs:
            reqs[0].cancel()                  # mid-prefill (budget 24 < its 55 tokens)
        if step == 6 and 1 in reqs:
            reqs[1].cancel()                  # decoding
    cache = fresh(eng)
    on = run(eng, cache, specs, slots=2, arrive=[0, 2, 7, 8], cancel=cancel)
    assert on[0].result().finish_reason == "cancelled" and on[1].result().finish_reason == "cancelled"
    assert on[2].cached_tokens == 3 * BLOCK
    off = run(eng, None, specs, slots=2, arrive=[0, 2, 7, 8], cancel=cancel)
    assert tokens(on)[2:] == tokens(off)[2:]


def test_generate_reuses_the_engines_cache_and_the_switch(eng):
    p = ids(50, 50)
    eng.set_prefix_cache(0.01)
    a = eng.generate([p], max_new_tokens=6, persona=STRONG_A)[0]
    b = eng.generate([p], max_new_tokens=6, persona=STRONG_A)[0]
    assert eng.prefix_cache().stats.hit_tokens == 3 * BLOCK and a.token_ids == b.token_ids
    eng.set_prefix_cache(0)
    assert eng.prefix_cache() is None
    assert eng.generate([p], max_new_tokens=6, persona=STRONG_A)[0].token_ids == a.token_ids
    eng.set_prefix_cache(pc.PREFIX_CACHE_GB)


@pytest.mark.parametrize("gb", [-1, "1", True, float("nan")])
def test_bad_budget_is_one_line(eng, gb):
    with pytest.raises(RequestError) as e:
        PrefixCache.for_engine(eng, gb)
    assert "\n" not in str(e.value) and "prefix_cache_gb=" in str(e.value)


def test_lru_evicts_leaves_before_their_parents():
    c = PrefixCache(budget_bytes=3 * 64, block=2, layers=1, kv_heads=1, head_dim=4, dtype=torch.float32)
    assert c.block_bytes == 64 and c.capacity == 3
    kv = lambda c0, c1: (torch.zeros(1, 1, c1 - c0, 4),) * 2   # noqa: E731
    root = ("base",)
    c.insert(root, [1, 2, 3, 4, 5, 6], 6, None, kv)             # a chain of three blocks
    assert len(c.lookup(root, [1, 2, 3, 4, 5, 6, 7], 7).persona) == 3
    c.insert(root, [9, 9], 2, None, kv)                         # evicts the oldest: the leaf
    assert c.stats.evictions == 1 and c.bytes == 3 * 64
    assert len(c.lookup(root, [1, 2, 3, 4, 5, 6, 7], 7).persona) == 2   # the parents stayed
    assert c.lookup(("base", "other"), [1, 2, 3, 4], 4).persona == []   # another root: nothing


def test_default_budget_from_the_environment(eng, monkeypatch):
    monkeypatch.delenv("PF_PREFIX_CACHE_GB", raising=False)
    assert pc.default_gb() == pc.PREFIX_CACHE_GB
    monkeypatch.setenv("PF_PREFIX_CACHE_GB", "0.25")
    assert pc.default_gb() == 0.25
    monkeypatch.setenv("PF_PREFIX_CACHE_GB", "lots")
    with pytest.raises(RequestError, match="prefix_cache_gb='lots'"):
        PrefixCache.for_engine(eng, pc.default_gb())
