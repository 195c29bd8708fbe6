"""The step runner (pf_engine/runtime/runner.py) and the step value it hands the model
(pf_engine/model/step.py): what kind of forward a call is is decided once, by the plan, and
never inferred from a shape below it.

Offline, CPU, fp32: one tiny random Llama with a random bank (both routers), the cpu backend
where it is built (its fused decode step is the path the step decides), else torch.
"""
import pytest
import torch

from pf_engine import Engine
from pf_engine.backends import backend_status
from pf_engine.model.config import ModelConfig
from pf_engine.model.decoder import SCRATCH, causal_mask
from pf_engine.model.step import WHOLE, Step
from pf_engine.persona.bank import BIG_FIVE, AdapterBank
from pf_engine.runtime.config import SchedulerConfig
from pf_engine.runtime.runner import Plan
from pf_engine.runtime.scheduler import Scheduler
from pf_engine.generation.sampling import SamplingParams


class Kind:
    """A stand-in request for Plan: only what a plan reads."""

    def __init__(self, kind: str, slot: int, length: int):
        self.kind, self.slot, self.length = kind, slot, length


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    folder, _ = hf_model_dir("llama", "runner_base")
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    bank = AdapterBank.random(cfg, rank=4, seed=5, router=True)
    backend = "cpu" if backend_status("cpu", torch.device("cpu"))[0] else "torch"
    return Engine.from_pretrained(folder, adapters=bank, backend=backend, progress=False,
                                  device="cpu", dtype="fp32")


@pytest.mark.parametrize("kinds, mixed, token", [
    (["base", "base"], False, False),
    (["base", "sequence"], True, False),
    (["explicit", "token", "base"], True, True),
])
def test_the_plan_decides_the_step(kinds, mixed, token):
    reqs = [Kind(k, 2 + i, 5 + i) for i, k in enumerate(kinds)]
    d = Plan.decode_of(reqs)
    assert d.step == Step(True, mixed, token)
    assert (d.s0, d.starts, d.counts, d.sample) == (2, [5 + i for i in range(len(kinds))],
                                                   [1] * len(kinds), len(kinds))
    p = Plan(reqs, [0] * len(kinds), [1] * len(kinds), [[7]] * len(kinds), 0)
    assert p.step == Step(False, mixed, token)        # one token per row, and still a prefill


def test_a_decode_step_of_several_tokens_is_refused(engine):
    ids = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="decode step has one token per row"):
        engine.model(ids, torch.arange(2).view(1, 2), SCRATCH,
                     causal_mask(2, engine.config.sliding_window, "cpu"), step=Step(decode=True))


def test_one_token_prefill_chunks_are_prefill_steps(engine):
    """A prompt prefilled one token per step (prefill_budget=1) runs its chunks as prefill steps
    and its new tokens as decode steps: the blocks see what the plan decided, although every
    forward has one token per row; the tokens equal a whole-prompt prefill's."""
    model = engine.model
    seen, inner = [], model.runner

    def spy(x, cos, sin, cache, mask, mix, step):
        seen.append((x.shape[1], step.decode))
        return inner(x, cos, sin, cache, mask, mix, step)

    ids = [5, 9, 14, 3]
    want = engine.generate([ids], max_new_tokens=3, persona={BIG_FIVE[2]: 0.8})[0].token_ids
    model.runner = spy
    try:
        sched = Scheduler(engine, SchedulerConfig(1, 16, prefill_budget=1, background=False,
                                                  prefix_cache=None))
        req = sched.submit(ids, SamplingParams(max_new_tokens=3), {BIG_FIVE[2]: 0.8})
        sched.run()
    finally:
        model.runner = inner
    assert req.result().token_ids == want
    assert seen == [(1, False)] * len(ids) + [(1, True)] * 2     # the last token is not fed back


def test_whole_sequences_are_not_decode_steps(engine):
    """Engine.logits over one token is a whole-sequence pass (WHOLE), not a decode step."""
    model, seen, inner = engine.model, [], engine.model.runner
    model.runner = lambda *a: seen.append(a[-1]) or inner(*a)
    try:
        engine.logits([[7]])
    finally:
        model.runner = inner
    assert seen == [WHOLE]


def test_personas_are_checked_once_per_call(engine, monkeypatch):
    """generate checks its persona specs once (one Personas for the call) and hands each request
    its row, where each request used to check its spec again."""
    import pf_engine.persona.specs as specs
    built, init = [], specs.Personas.__init__
    monkeypatch.setattr(specs.Personas, "__init__", lambda self, *a: (built.append(a[2]),
                                                                      init(self, *a))[1])
    outs = engine.generate([[5, 6], [7, 8, 9], [4]], max_new_tokens=2,
                           persona=[None, "auto", {BIG_FIVE[1]: 0.5}])
    assert built == [3]
    assert outs[1].gates["kind"] == "sequence" and outs[2].gates["weights"] == {BIG_FIVE[1]: 0.5}


@pytest.mark.parametrize("prompt_len, want", [(3, 5), (60, 4), (63, 1)])
def test_one_budget_for_new_tokens(prompt_len, want):
    """max_new_tokens, or what the context leaves (64 here): the request, the scheduler's slot
    check and generate's pool all use SamplingParams.budget."""
    assert SamplingParams(max_new_tokens=5).budget(prompt_len, 64) == want


def test_greedy_is_argmax_with_its_tie_rule():
    """sampling.greedy (torch.max's indices, faster than argmax) picks what argmax picks: the
    first of equal maxima, a NaN first, and index 0 of an all -inf row."""
    from pf_engine.generation.sampling import greedy
    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    for trial in range(300):
        V = int(torch.randint(1, 50000, (1,), generator=g))
        x = torch.randint(-3, 3, (3, V), generator=g).float()       # many ties
        x[1, ::7] = float("-inf")
        x[2, V // 2] = float("nan")
        if trial % 7 == 0:
            x[0] = float("-inf")
        assert torch.equal(greedy(x), x.argmax(-1)), trial
    x = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 3.0], [2.0, 5.0, 1.0, 5.0, 0.0]])
    assert greedy(x).tolist() == [3, 1]
