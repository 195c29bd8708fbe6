"""An "auto" request routed from its own prefill's lower layers (issue 37; runtime/routing.py).

The tiny four-layer Llama of test_prefix_split, its bank adapting layers 2-3 (split 2) and its
sequence router reading the states entering block 1.  The router's input is computed once, by
the prefill (no pass of its own), and equals the separate pass's; the prompt's lower layers run
once per token (or not at all where the prefix cache shares them); a later "auto" request routed
to the same gates reuses the persona blocks; a request moved between slots while its gates are
pending keeps its lower layers; a router reading an adapted layer routes by its own pass.
"""
import pytest
import torch

from pf_engine.model import decoder as dec
from pf_engine.runtime.prefix_cache import BLOCK, PrefixCache
from pf_engine.runtime.routing import TwoPhase
from pf_engine.generation.sampling import SamplingParams

from test_prefix_split import CPU, LAYERS, bank_for, engine, ids, outputs, run


@pytest.fixture(scope="module")
def folder(hf_model_dir):
    return hf_model_dir("llama", "split_base", num_hidden_layers=LAYERS)[0]


@pytest.fixture
def count_tokens(monkeypatch):
    """Prompt tokens each block computed (decode steps not counted): {block index: rows};
    ``Decoder.hidden`` (the router's own pass) raises."""
    seen: dict[int, int] = {}
    call = dec.Block.__call__

    def counted(self, x, cos, sin, cache, mask, mix=None, step=dec.WHOLE):
        if not step.decode:
            seen[self.index] = seen.get(self.index, 0) + x.shape[0] * x.shape[1]
        return call(self, x, cos, sin, cache, mask, mix, step)

    def refused(*a, **k):
        raise AssertionError("the router ran a pass of its own")
    monkeypatch.setattr(dec.Block, "__call__", counted)
    monkeypatch.setattr(dec.Decoder, "hidden", refused)
    return seen


def same_outputs(on, off):
    """Tokens and finish reasons equal, logprobs to 1e-5: the torch backend's fp32 GEMMs are not
    batch-invariant (a prompt's tail computed as a chunk after cached blocks, or within its
    whole prefill, is blocked differently), so logprobs may differ in their last bits: 5 of 12
    prompts did so before the routers computed in float64, other prompts after."""
    a, b = outputs(on), outputs(off)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x[2], y[2], atol=1e-5, rtol=0)
    return True


def separate_pass_gates(eng, prompt):
    """The gates of Personas.route: the router over a pass of its own on the whole prompt."""
    r = eng.bank.router
    *_, h = eng.model.layer_states(torch.tensor([prompt]), r.layer)     # what Decoder.hidden does
    return r(h)[0]


def gates_of(req, eng):
    g = req.result().gates["weights"]
    return torch.tensor([g.get(n, 0.0) for n in eng.bank.expert_names])


@pytest.mark.parametrize("kw", [dict(backend="torch")] + (
    [dict(backend="cpu", quantize="q4")] if CPU else []), ids=["torch-fp32", "cpu-q4"][:1 + CPU])
def test_auto_routes_from_the_prefill_with_no_pass_of_its_own(folder, kw, count_tokens):
    """Cache off, budget 8 (the two phases span several steps): each block computes each prompt
    token once (the last one twice below the split: in the first phase, then in the ordinary
    prefill that samples), and the gates equal those of the router's own pass on the whole prompt."""
    eng = engine(folder, **kw)
    assert TwoPhase.of(eng, None) is not None
    prompt, n = ids(3 * BLOCK + 7, 9), 5
    sched = eng.new_scheduler(slots=2, max_len=120, prefill_budget=8, background=False)
    sched.prefix = None
    req = sched.submit(prompt, SamplingParams(max_new_tokens=n), "auto")
    sched.run()
    T = len(prompt)
    assert count_tokens == {0: T + 1, 1: T + 1, 2: T, 3: T}
    assert sched.stats.prefill_tokens == T                  # each prompt token counted once
    ref = separate_pass_gates(eng, prompt)
    torch.testing.assert_close(gates_of(req, eng), ref, atol=1e-5, rtol=0)


def test_auto_computes_no_lower_layer_of_a_shared_system_prompt(folder, count_tokens):
    """A base request fills the shared chain; an "auto" request on the same system prompt
    computes its lower layers only for its own turn (their router input read from the shared
    blocks), and its output equals the cache-off run's."""
    eng = engine(folder)
    system = ids(3 * BLOCK + 2, 1)
    specs = [(system + ids(6, 7), None, 3), (system + ids(9, 8), "auto", 4)]
    cache = PrefixCache.for_engine(eng, 0.01)
    on = run(eng, cache, specs, arrive=[0, 6])
    lower_on = count_tokens[0]
    count_tokens.clear()
    off = run(eng, None, specs, arrive=[0, 6])
    assert same_outputs(on, off)
    assert on[1].shared_cached_tokens == 3 * BLOCK
    assert count_tokens[0] - lower_on == 3 * BLOCK           # the blocks the cache shared


def test_auto_reuses_the_persona_blocks_of_the_same_gates(folder):
    """The same "auto" request twice: the second hits its own persona chain (keyed by the
    exact gates), none of it computed from the shared states; another user turn on the same
    system prompt routes to other gates and shares only the lower layers."""
    eng = engine(folder)
    system = ids(3 * BLOCK + 2, 1)
    a, b = system + ids(6, 7), system + ids(8, 3)
    specs = [(a, "auto", 3), (a, "auto", 3), (b, "auto", 3)]
    cache = PrefixCache.for_engine(eng, 0.01)
    on, off = run(eng, cache, specs, arrive=[0, 6, 12]), run(eng, None, specs, arrive=[0, 6, 12])
    assert same_outputs(on, off)
    assert [(r.cached_tokens, r.shared_cached_tokens) for r in on] == \
        [(0, 0), (3 * BLOCK, 0), (3 * BLOCK, 3 * BLOCK)]
    assert on[0].result().gates != on[2].result().gates


def test_a_pending_request_moved_to_another_slot_keeps_its_lower_layers(folder):
    """A short request ahead of an "auto" one finishes while the auto one is still in its lower
    phase (budget 8): the auto request moves to slot 0 with every column its lower phase filled,
    and its output equals its output alone."""
    eng = engine(folder)
    prompt = ids(3 * BLOCK + 5, 4)
    specs = [(ids(3, 5), None, 3), (prompt, "auto", 4)]

    def sched_run(specs):
        sched = eng.new_scheduler(slots=2, max_len=120, prefill_budget=8, background=False)
        sched.prefix = None
        reqs = [sched.submit(p, SamplingParams(max_new_tokens=n, logprobs=0), per)
                for p, per, n in specs]
        moved = []
        while sched.pending():
            sched.step()
            r = reqs[-1]
            moved.append((r.slot, r.lower.done if r.lower is not None else None))
        return reqs, moved
    both, moved = sched_run(specs)
    alone, _ = sched_run(specs[1:])
    pending = [done for slot, done in moved if slot == 0 and done]
    assert pending and pending[0] < len(prompt)     # moved to slot 0 mid-way in its lower phase
    assert outputs(both[1:]) == outputs(alone)


def test_a_router_reading_an_adapted_layer_routes_by_its_own_pass(folder, monkeypatch):
    """Router at block 3, split 2: its input depends on the persona's gates, so no two-phase
    prefill (and shared blocks keep only the split's states); outputs equal the cache-off run."""
    from pf_engine import Engine
    eng = Engine.from_pretrained(folder, adapters=bank_for(folder, True, route=3), progress=False,
                                 device="cpu", backend="torch")
    assert TwoPhase.of(eng, None) is None
    cache = PrefixCache.for_engine(eng, 0.01)
    assert cache.keep == (2,)
    system = ids(3 * BLOCK + 2, 1)
    specs = [(system + ids(6, 7), None, 3), (system + ids(9, 8), "auto", 4)]
    on, off = run(eng, cache, specs, arrive=[0, 6]), run(eng, None, specs, arrive=[0, 6])
    assert same_outputs(on, off) and on[1].shared_cached_tokens == 3 * BLOCK
