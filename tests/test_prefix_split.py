"""The prefix cache split at the bank's first adapted layer (issue 37; runtime/prefix_cache.py):
the layers below it are keyed by the tokens alone and shared by every persona and the base model,
with the hidden states entering the split layer, from which a request of another persona computes
its own layers (``StepRunner.resume``) instead of prefilling the prompt.

A tiny random Llama of four layers whose bank (both routers) adapts layers 2-3 only (split 2),
and the same model with a bank adapting every layer (split 0: nothing shared across personas).
Greedy tokens and their logprobs with the cache equal those without it for every persona kind,
under eviction and cancellation; on the 4-bit cpu path bit for bit.  A shared key one layer too
high (layer 2's KV keyed by tokens alone) changes the output: the test above it would fail.
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.backends import backend_status
from pf_engine.model.config import ModelConfig
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.persona.router import SequenceRouter
from pf_engine.runtime import prefix_cache as pc
from pf_engine.runtime.prefix_cache import BLOCK, PrefixCache

CPU = backend_status("cpu", torch.device("cpu"))[0]
LAYERS = 4
A, B = {BIG_FIVE[0]: 2.5, BIG_FIVE[4]: 1.5}, {BIG_FIVE[7]: 3.0}
PERSONAS = [None, A, "auto", "token", B, {BIG_FIVE[2]: 0.6, BIG_FIVE[9]: 0.5}]


def bank_for(folder, upper_only: bool, route: int = 1) -> AdapterBank:
    """The random bank, its sequence router reading the states entering block ``route`` (1:
    below the split, as bigfive's reads layer 9 of 30 under its split 18)."""
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    full = AdapterBank.random(cfg, rank=8, seed=5, router=True)
    r = full.router
    router = SequenceRouter(r.w1, r.b1, r.w2, r.b2, layer=route)
    weights = {(l, m): ab for (l, m), ab in full._weights.items() if l >= 2 or not upper_only}
    return AdapterBank(full.expert_names, full.ranks, full.scalings, full.fingerprint,
                       full.module_experts, weights, router=router,
                       token_router=full.token_router)


@pytest.fixture(scope="module")
def folder(hf_model_dir):
    return hf_model_dir("llama", "split_base", num_hidden_layers=LAYERS)[0]


def engine(folder, upper_only=True, **kw):
    kw.setdefault("backend", "torch")
    return Engine.from_pretrained(folder, adapters=bank_for(folder, upper_only), progress=False,
                                  device="cpu", **kw)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(eng, cache, specs, slots=3, arrive=None, cancel=None):
    """test_prefix_cache's scheduler loop, with logprobs and room for longer prompts."""
    from test_prefix_cache import run as run_specs
    return run_specs(eng, cache, specs, slots, arrive, cancel, max_len=200, logprobs=0)


def outputs(reqs, logprobs=True):
    return [(r.result().token_ids, r.result().finish_reason,
             [lp.logprob for lp in r.result().logprobs] if logprobs else None) for r in reqs]


def stream(n: int = 12):
    """Requests on two system prompts (three and a half blocks), each with its own user turn and
    a persona drawn independently of the system prompt."""
    systems = [ids(3 * BLOCK + 8, 1), ids(3 * BLOCK + 3, 2)]
    return [(systems[i % 2] + ids(5 + i % 4, 100 + i), PERSONAS[(i * 5) % len(PERSONAS)], 6)
            for i in range(n)]


def test_the_split_is_the_banks_first_adapted_layer(folder):
    assert PrefixCache.for_engine(engine(folder), 0.01).split == 2
    assert PrefixCache.for_engine(engine(folder, upper_only=False), 0.01).split == 0
    plain = Engine.from_pretrained(folder, progress=False, device="cpu")
    assert PrefixCache.for_engine(plain, 0.01).split == 0


@pytest.mark.parametrize("kw", [dict(backend="torch")] + (
    [dict(backend="cpu", quantize="q4")] if CPU else []), ids=["torch-fp32", "cpu-q4"][:1 + CPU])
def test_shared_layers_serve_every_persona_and_outputs_equal_the_cache_off_run(folder, kw):
    """Every persona kind on two system prompts: the later requests of a system prompt reuse its
    lower layers whatever their persona (their own layers computed from the kept hidden
    states), and greedy tokens equal the cache-off run's; with the kernel's batch-invariant
    products (4-bit) the logprobs too, bit for bit."""
    eng = engine(folder, **kw)
    cache = PrefixCache.for_engine(eng, 0.01)
    specs = stream()
    on, off = run(eng, cache, specs), run(eng, None, specs)
    exact = kw.get("quantize") == "q4"
    assert outputs(on, exact) == outputs(off, exact)
    assert cache.stats.shared_hit_tokens >= 3 * BLOCK * 4
    assert all(r.cached_tokens == 3 * BLOCK for r in on[3:])      # the system prompts' blocks


def test_a_bank_adapting_every_layer_shares_nothing_across_personas(folder):
    eng = engine(folder, upper_only=False)
    cache = PrefixCache.for_engine(eng, 0.01)
    p = ids(3 * BLOCK + 5, 3)
    on = run(eng, cache, [(p, A, 4), (p, B, 4), (p, A, 4)], arrive=[0, 5, 10])
    assert [r.cached_tokens for r in on] == [0, 0, 3 * BLOCK]
    assert cache.stats.shared_hit_tokens == 0


def test_a_token_only_key_on_an_adapted_layer_changes_the_output(folder, monkeypatch):
    """The mutation the equality test guards against: the split one layer too high shares layer
    2's KV (adapted) across personas; the second persona's output then differs from its
    cache-off self."""
    monkeypatch.setattr(pc, "split_layer", lambda engine: 3)
    eng = engine(folder)
    cache = PrefixCache.for_engine(eng, 0.01)
    assert cache.split == 3
    p = ids(3 * BLOCK + 5, 4)
    specs = [(p, A, 10), (p, B, 10)]
    on, off = run(eng, cache, specs, arrive=[0, 5]), run(eng, None, specs, arrive=[0, 5])
    assert on[1].cached_tokens == 3 * BLOCK and outputs(on)[1] != outputs(off)[1]


def test_under_eviction_and_cancellation(folder):
    """A budget of five blocks (both parts) for prompts of three and a half: shared and persona
    blocks are evicted apart (a persona chain outliving its shared chain is not used), one
    request is cancelled mid-prefill and one while decoding; the others' outputs are unchanged
    and the cache never holds more than its budget."""
    eng = engine(folder)
    cache = PrefixCache.for_engine(eng, 0.01)
    cache.budget_bytes, cache.capacity = 5 * cache.block_bytes, 5
    specs = stream(10)
    seen = []

    def cancel(step, reqs):
        seen.append(cache.bytes)
        if step == 1 and 0 in reqs:
            reqs[0].cancel()
        if step == 9 and 3 in reqs:
            reqs[3].cancel()
    on = run(eng, cache, specs, slots=2, cancel=cancel)
    off = run(eng, None, specs, slots=2, cancel=cancel)
    assert on[0].result().finish_reason == "cancelled"
    assert cache.stats.evictions > 0 and max(seen) <= cache.budget_bytes
    assert outputs(on, False) == outputs(off, False)
    assert cache.stats.shared_hit_tokens > 0


def test_the_bytes_of_a_block(folder):
    """A shared block holds the lower layers' KV and the hidden states entering the router's
    layer and the split, a persona block the upper layers' KV: together the whole KV and h."""
    eng = engine(folder)
    cache = PrefixCache.for_engine(eng, 0.01)
    assert cache.keep == (1, 2)
    c = eng.config
    per_layer = 2 * c.num_key_value_heads * BLOCK * c.head_dim * 4
    assert cache.shared_bytes == 2 * per_layer + 2 * BLOCK * c.hidden_size * 4
    assert cache.persona_bytes == 2 * per_layer


def test_through_pf_serve_usage_and_metrics_count_shared_hits(tiny_chat_model):
    """The real openai client against pf-serve (a tiny chat model whose bank adapts its upper
    layer only): one system prompt, a chat under one persona, then under another: the second's
    usage reports its system prompt's blocks as cached, all of them from the shared layers,
    and /metrics counts them; the same persona again hits its own blocks (none shared)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    import httpx
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    folder = tiny_chat_model[0]
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    full = AdapterBank.random(cfg, rank=4, seed=5, router=True)
    weights = {k: ab for k, ab in full._weights.items() if k[0] >= 1}
    bank = AdapterBank(full.expert_names, full.ranks, full.scalings, full.fingerprint,
                       full.module_experts, weights, router=full.router)
    eng = Engine.from_pretrained(folder, adapters=bank, progress=False, device="cpu")
    eng.set_prefix_cache(0.01)
    eng.new_scheduler(slots=2, max_len=160)
    s = ThreadedServer(build_app(eng, "tiny", max_queue=8, timeout_s=60))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        system = "the quick brown fox jumps over the lazy dog. " * 5

        def chat(persona, user):
            r = client.chat.completions.create(
                model="tiny", max_tokens=3, temperature=0, extra_body={"persona": persona},
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
            d = r.usage.prompt_tokens_details.model_dump()
            return {k: d.get(k) for k in ("cached_tokens", "shared_cached_tokens")}
        first = chat(A, "hello world")
        second = chat(B, "bonjour le monde")
        third = chat(B, "hello again")
        metrics = httpx.get(s.url + "/metrics").text
    finally:
        s.close()
    assert first == {"cached_tokens": 0, "shared_cached_tokens": 0}
    assert second["cached_tokens"] >= 2 * BLOCK and second["shared_cached_tokens"] == second["cached_tokens"]
    assert third["cached_tokens"] >= second["cached_tokens"] and third["shared_cached_tokens"] == 0
    total = [line for line in metrics.splitlines()
             if line.startswith("pf_prefix_cache_shared_hit_tokens_total ")]
    assert total and float(total[0].split()[1]) == second["shared_cached_tokens"]
